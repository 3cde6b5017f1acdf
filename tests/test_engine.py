"""The engine's greedy output equals transformers' `generate`, alone and inside a mixed batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import hf_greedy, hf_reference_model
from transerve.actors.assembly import load
from transerve.config import CacheConfig, EngineConfig, SchedulerConfig
from transerve.engine.core import generate
from transerve.engine.host_tensors import TORCH_DTYPES, arrays_to_device
from transerve.engine.request import Request, SamplingParams

PROMPT_LENGTHS = [5, 17, 40, 100, 3, 64, 33, 250]


def make_engine(spec: str, num_kv_blocks: int = 256, max_num_batched_tokens: int = 64, max_num_seqs: int = 64,
                quantization: str = "none"):
    config = EngineConfig(
        quantization=quantization,
        cache=CacheConfig(block_size=16, num_kv_blocks=num_kv_blocks),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens),
    )
    return load(spec, config, allow_download=False)


def random_prompts(vocab_size: int, lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lengths]


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


EOS = frozenset({2})  # the tiny models' and SmolLM2's end of sequence: generate() stops there too


@pytest.mark.parametrize("repo_id", ["tiny/llama", "tiny/qwen2"])
def test_greedy_matches_generate_alone_and_in_a_mixed_batch(tiny_repos, repo_id):
    loaded = make_engine(repo_id)
    reference = hf_reference_model(tiny_repos[repo_id])
    prompts = random_prompts(reference.config.vocab_size, PROMPT_LENGTHS)
    expected = [hf_greedy(reference, p, 24) for p in prompts]

    alone = generate(loaded.core, loaded.runner, [Request("alone", prompts[3], greedy(24), seed=0, eos_token_ids=EOS)])
    assert alone["alone"] == expected[3]

    # A 64-token budget splits the long prompts into chunks that share steps with decodes.
    batch = [Request(str(i), p, greedy(24), seed=0, eos_token_ids=EOS) for i, p in enumerate(prompts)]
    outputs = generate(loaded.core, loaded.runner, batch)
    assert [outputs[str(i)] for i in range(len(prompts))] == expected
    assert loaded.core.block_manager.num_free_blocks == loaded.core.block_manager.num_blocks
    # Steps run without autograd: a KV cache that records its writes' history grows by megabytes a step.
    assert all(cache.grad_fn is None for layer in loaded.runner.kv_caches for cache in layer)


def test_preemption_under_a_small_kv_cache_keeps_outputs_exact(tiny_repos):
    # 24 blocks of 16 tokens cannot hold eight requests at once: some are preempted and recomputed.
    loaded = make_engine("tiny/llama", num_kv_blocks=24)
    reference = hf_reference_model(tiny_repos["tiny/llama"])
    prompts = random_prompts(reference.config.vocab_size, [30, 45, 60, 20, 50, 35, 40, 25], seed=2)
    outputs = generate(loaded.core, loaded.runner, [Request(str(i), p, greedy(40), seed=0, eos_token_ids=EOS) for i, p in enumerate(prompts)])
    assert loaded.core.scheduler.num_preemptions > 0
    assert [outputs[str(i)] for i in range(len(prompts))] == [hf_greedy(reference, p, 40) for p in prompts]
    assert loaded.core.block_manager.num_free_blocks == 24


def test_prefix_cache_hit_gives_the_same_tokens(tiny_repos):
    loaded = make_engine("tiny/qwen2")
    prompt = random_prompts(1000, [70], seed=3)[0]
    first = generate(loaded.core, loaded.runner, [Request("a", prompt, greedy(10), seed=0, eos_token_ids=EOS)])["a"]
    again = Request("b", prompt, greedy(10), seed=0, eos_token_ids=EOS)
    second = generate(loaded.core, loaded.runner, [again])["b"]
    assert again.num_cached_tokens == 64  # four full blocks reused
    assert second == first
    assert loaded.core.block_manager.num_free_blocks == loaded.core.block_manager.num_blocks


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_repos):
    loaded = make_engine("tiny/llama")
    prompts = random_prompts(1000, [12, 30, 7], seed=4)
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, ignore_eos=True)
    alone = generate(loaded.core, loaded.runner, [Request("x", prompts[0], params, seed=1234, eos_token_ids=EOS)])["x"]
    batch = [Request("x", prompts[0], params, seed=1234, eos_token_ids=EOS)] + [Request(str(i), p, params, seed=i, eos_token_ids=EOS) for i, p in enumerate(prompts[1:])]
    assert generate(loaded.core, loaded.runner, batch)["x"] == alone


@pytest.mark.slow
def test_smollm2_greedy_matches_generate_alone_and_batched(smollm2_dir, tokenizer):
    # float32, as the reference (a GGUF served by default keeps its quantized weights: tests/test_quantized_serving.py)
    loaded = make_engine("SmolLM2-135M-Instruct", num_kv_blocks=512, max_num_batched_tokens=256, quantization="none")
    reference = hf_reference_model(smollm2_dir)
    questions = ["What is the capital of France?", "Write a haiku about the sea.", "List three colours.",
                 "Explain gravity in one sentence.", "Hi!", "What is 2 + 2?", "Name a famous painter.",
                 "Describe a cat to someone who has never seen one, in detail."]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"] for q in questions]
    expected = [hf_greedy(reference, p, 20) for p in prompts]
    alone = generate(loaded.core, loaded.runner, [Request("alone", prompts[0], greedy(20), seed=0, eos_token_ids=EOS)])["alone"]
    assert alone == expected[0]
    assert "Paris" in tokenizer.decode(alone)
    outputs = generate(loaded.core, loaded.runner, [Request(str(i), p, greedy(20), seed=0, eos_token_ids=EOS) for i, p in enumerate(prompts)])
    assert [outputs[str(i)] for i in range(len(prompts))] == expected
    assert loaded.core.block_manager.num_free_blocks == 512


def test_step_inputs_reach_the_device_as_the_arrays_zero_copy_or_through_one_staged_buffer():
    """On CPU the tensors are the arrays; staged (as on CUDA, where the buffer is pinned) they are views of one
    copied buffer, each aligned for its dtype whatever the sizes before it."""
    arrays = [np.arange(5, dtype=np.int64)[None], np.arange(6, dtype=np.int32).reshape(2, 3),
              np.array([0.5, 1.0, 2.0], np.float32), np.zeros(0, np.int64), np.array([7], np.int32), np.array([-3], np.int64)]
    expected = [(TORCH_DTYPES[a.dtype], a.shape, a.tolist()) for a in arrays]
    for stage in (False, True):
        tensors = arrays_to_device(arrays, torch.device("cpu"), stage=stage)
        assert [(t.dtype, tuple(t.shape), t.tolist()) for t in tensors] == expected
