"""Tensor parallelism on CPU (gloo, 2 ranks): the same greedy tokens and close logprobs as one rank,
alone and in a preempting batch with chunked prefill, on Llama, Qwen2 and a Qwen3 with 8 query heads
over 2 KV heads; heads that do not divide are refused before any rank starts."""

from __future__ import annotations

import pytest
import torch

from conftest import save_in_hf_cache
from test_engine import EOS, greedy, random_prompts
from transerve.actors.assembly import load
from transerve.config import CacheConfig, EngineConfig, SchedulerConfig
from transerve.engine.core import generate
from transerve.engine.request import Request, SamplingParams

LENGTHS = [30, 45, 60, 20, 50, 35, 40, 25]


@pytest.fixture(scope="module")
def gqa_repo(tokenizer, tmp_path_factory):
    """tiny/qwen3-gqa: 8 query heads over 2 KV heads (4 per rank over 1), with Qwen3's per-head norms."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    work = tmp_path_factory.mktemp("qwen3-gqa")
    torch.manual_seed(0)
    config = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                         num_key_value_heads=2, head_dim=16, vocab_size=len(tokenizer), max_position_embeddings=1024,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, architectures=["Qwen3ForCausalLM"])
    AutoModelForCausalLM.from_config(config).save_pretrained(work)
    tokenizer.save_pretrained(work)
    save_in_hf_cache("tiny/qwen3-gqa", work)
    return "tiny/qwen3-gqa"


def engine(spec: str, tensor_parallel_size: int, num_kv_blocks: int = 24):
    config = EngineConfig(device="cpu", tensor_parallel_size=tensor_parallel_size,
                          cache=CacheConfig(block_size=16, num_kv_blocks=num_kv_blocks),
                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64))
    return load(spec, config, allow_download=False)


def run(loaded, prompts, max_tokens, params=None):
    requests = [Request(str(i), p, params or greedy(max_tokens), seed=0, eos_token_ids=EOS) for i, p in enumerate(prompts)]
    outputs = generate(loaded.core, loaded.runner, requests)
    return [outputs[str(i)] for i in range(len(prompts))]


def first_logprobs(loaded, prompt):
    """The top-5 logprobs of the first token sampled after `prompt`, as a user asking for logprobs sees them."""
    params = SamplingParams(max_tokens=1, temperature=0.0, num_logprobs=5)
    loaded.core.add_request(Request("lp", prompt, params, seed=0, eos_token_ids=EOS))
    step, scheduled = loaded.core.schedule()
    sampled = loaded.runner.execute(scheduled)
    loaded.core.apply(step, sampled)
    return sampled.logprobs["lp"]


@pytest.mark.parametrize("repo", ["tiny/llama", "tiny/qwen2", "gqa"])
def test_two_ranks_give_one_ranks_tokens_alone_and_in_a_preempting_batch(tiny_repos, gqa_repo, repo):
    spec = gqa_repo if repo == "gqa" else repo
    single, split = engine(spec, 1), engine(spec, 2)
    try:
        assert split.runner.ranks.dead_rank() is None
        # Each rank's KV cache holds half the KV heads.
        assert split.runner.runner.kv_caches[0][0].shape[2] * 2 == single.runner.kv_caches[0][0].shape[2]
        prompts = random_prompts(single.vocab_size, LENGTHS, seed=4)
        assert run(split, prompts[:1], 16) == run(single, prompts[:1], 16)
        # 24 blocks of 16 tokens cannot hold all eight; a 64-token budget chunks the prompts.
        assert run(split, prompts, 32) == run(single, prompts, 32)
        assert split.core.scheduler.num_preemptions > 0
        expected, got = first_logprobs(single, prompts[2]), first_logprobs(split, prompts[2])
        assert got.top_ids == expected.top_ids
        assert got.top_logprobs == pytest.approx(expected.top_logprobs, abs=1e-4)
    finally:
        split.runner.ranks.close()


def test_heads_that_do_not_divide_are_refused_before_any_rank_starts(tiny_repos):
    with pytest.raises(ValueError, match=r"--tensor-parallel-size 3 does not divide the model's 4 attention heads.*: 1, 2"):
        engine("tiny/llama", 3)


def test_tensor_parallel_serving_needs_the_model_named_at_start():
    from transerve.cli.main import build_parser
    from transerve.cli.serve import config_from_args

    with pytest.raises(ValueError, match="--tensor-parallel-size needs MODEL"):
        config_from_args(build_parser().parse_args(["serve", "--tensor-parallel-size", "2"]))
    config = config_from_args(build_parser().parse_args(["serve", "tiny/llama", "-tp", "2", "--device", "cpu"]))
    assert config.engine.tensor_parallel_size == 2
