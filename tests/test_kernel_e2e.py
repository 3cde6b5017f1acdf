"""End to end: a tiny random Llama through the engine gives the same greedy tokens on the Triton
kernels (interpreted on CPU) as on the torch references."""

from __future__ import annotations

import copy

import pytest
import torch

from kernel_utils import DEVICE, GPU, import_kernels

K = import_kernels()

from transerve.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from transerve.engine.core import EngineCore, generate  # noqa: E402
from transerve.engine.attention import ATTN_IMPLEMENTATION, register_attention  # noqa: E402
from transerve.engine.model_runner import ModelRunner  # noqa: E402
from transerve.engine.request import Request, SamplingParams  # noqa: E402

BLOCK_SIZE = 16
NUM_BLOCKS = 64
MAX_MODEL_LEN = 256


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM, LlamaConfig

    register_attention()
    config = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512, max_position_embeddings=MAX_MODEL_LEN, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    # from_config writes the attention implementation into the config: give it its own copy.
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=ATTN_IMPLEMENTATION)
    # float32 on GPU too: bf16 rounding differences could legitimately flip a greedy near-tie.
    return model.to(device=DEVICE, dtype=torch.float32).eval()


def _requests():
    gen = torch.Generator().manual_seed(1)
    shared = torch.randint(0, 512, (20,), generator=gen).tolist()  # a common prefix: prefix-cache hits
    prompts = [shared + torch.randint(0, 512, (n,), generator=gen).tolist() for n in (3, 30, 1)]
    prompts.append(torch.randint(0, 512, (45,), generator=gen).tolist())
    return [
        Request(f"r{i}", p, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True), seed=i)
        for i, p in enumerate(prompts)
    ]


def _generate(model, triton: bool, monkeypatch) -> dict[str, list[int]]:
    if GPU:
        pass  # CUDA picks Triton by itself; the reference run swaps the references in below
    elif triton:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    config = EngineConfig(device=str(DEVICE), cache=CacheConfig(block_size=BLOCK_SIZE, num_kv_blocks=NUM_BLOCKS))
    runner = ModelRunner(model, config, NUM_BLOCKS, MAX_MODEL_LEN)
    if GPU and not triton:
        from transerve.kernels.reference import paged_attention_ref, sample_ref, write_kv_ref

        runner.write_kv, runner.paged_attention, runner.sample = write_kv_ref, paged_attention_ref, sample_ref
    expected = (K.kv_cache.write_kv, K.paged_attention.paged_attention, K.sampling.sample)
    assert ((runner.write_kv, runner.paged_attention, runner.sample) == expected) == triton
    # Small steps: prompts are prefilled in chunks while other requests decode in the same step.
    core = EngineCore(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=24), NUM_BLOCKS, BLOCK_SIZE, MAX_MODEL_LEN)
    return generate(core, runner, _requests())


def test_engine_greedy_tokens_match_reference(model, monkeypatch):
    want = _generate(model, triton=False, monkeypatch=monkeypatch)
    got = _generate(model, triton=True, monkeypatch=monkeypatch)
    assert all(len(tokens) == 6 for tokens in want.values())
    assert got == want
