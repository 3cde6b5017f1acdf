"""The KV cache's memory on CPU: committed as it is used, not when it is sized; 16-bit when asked."""

from __future__ import annotations

import resource

import pytest
import torch

from conftest import hf_greedy, hf_reference_model
from test_engine import EOS, greedy, random_prompts
from transerve.actors.assembly import load
from transerve.config import CacheConfig, EngineConfig, SchedulerConfig
from transerve.engine.core import generate
from transerve.engine.kv_sizing import allocate_kv_caches
from transerve.engine.request import Request

PAGE = resource.getpagesize()


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_cpu_kv_cache_holds_memory_only_where_it_was_written(dtype):
    shape = (2048, 16, 4, 64)  # 2 layers x K, V: 64 MiB each in float32
    before = resident_bytes()
    caches = allocate_kv_caches(2, shape, dtype, torch.device("cpu"))
    allocated = sum(t.numel() * t.element_size() for layer in caches for t in layer)
    assert resident_bytes() - before < allocated // 8  # sized, not committed
    assert all(t.dtype == dtype and t.shape == shape and t.is_contiguous() and not t.any() for layer in caches for t in layer)
    for layer in caches:  # a busy server writes its blocks: then they are resident
        for t in layer:
            t.fill_(1)
    assert resident_bytes() - before > allocated * 3 // 4


def test_a_bfloat16_kv_cache_on_cpu_serves_the_float32_models_greedy_tokens(tiny_repos):
    config = EngineConfig(cache=CacheConfig(block_size=16, num_kv_blocks=64, kv_cache_dtype="bfloat16"),
                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64))
    loaded = load("tiny/llama", config, allow_download=False)
    assert all(t.dtype == torch.bfloat16 for layer in loaded.runner.kv_caches for t in layer)
    reference = hf_reference_model(tiny_repos["tiny/llama"])
    prompts = random_prompts(reference.config.vocab_size, [12, 40, 75], seed=3)
    outputs = generate(loaded.core, loaded.runner, [Request(str(i), p, greedy(16), seed=0, eos_token_ids=EOS)
                                                    for i, p in enumerate(prompts)])
    # K/V rounded to bfloat16 may flip a near-tie late in a sequence; the first tokens must agree.
    for i, prompt in enumerate(prompts):
        assert outputs[str(i)][:8] == hf_greedy(reference, prompt, 16)[:8]


def test_another_kv_dtype_than_the_weights_is_refused_off_the_cpu():
    from transerve.engine.kv_sizing import kv_cache_dtype

    config = EngineConfig(cache=CacheConfig(kv_cache_dtype="float32"))
    with pytest.raises(ValueError, match="only the CPU"):
        kv_cache_dtype(config, torch.bfloat16, torch.device("cuda"))
    assert kv_cache_dtype(config, torch.bfloat16, torch.device("cpu")) == torch.float32
    assert kv_cache_dtype(EngineConfig(), torch.bfloat16, torch.device("cuda")) == torch.bfloat16
