"""VLMs in the paged engine, without HTTP: greedy output equals transformers' `generate` with images,
under chunked prefill, mixed with text requests, across prefix caching and preemption."""

from __future__ import annotations

import pytest

from test_engine import EOS, greedy, make_engine
from transerve.engine.core import generate
from transerve.engine.request import Request
from vision_helpers import Prompt, hf_greedy_with_images, random_image, reference_model, template_parts, vlm_repos

FAMILIES = ["tiny/qwen2-vl", "tiny/llava"]


@pytest.fixture(scope="module")
def repos(smollm2_dir, tmp_path_factory):
    return vlm_repos(smollm2_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def references(repos):
    return {repo: reference_model(path) for repo, path in repos.items()}


def prompts_of(repo: str, path, model) -> list[Prompt]:
    """Image requests (one image, two images of different sizes) and text requests, for one batch."""
    return [
        Prompt(path, model, template_parts("What is in this picture?", 1), (random_image(1, (100, 90)),)),
        Prompt(path, model, [{"role": "user", "content": "Say something long about the sea and the sky."}]),
        Prompt(path, model, template_parts("Compare these two.", 2), (random_image(2, (64, 64)), random_image(3, (150, 120)))),
        Prompt(path, model, template_parts("And this one?", 1), (random_image(4, (80, 160)),)),
        Prompt(path, model, [{"role": "user", "content": "Hi"}]),
    ]


def requests(prompts: list[Prompt], max_tokens: int) -> list[Request]:
    return [Request(str(i), p.ids, greedy(max_tokens), seed=0, eos_token_ids=EOS, multimodal=p.multimodal)
            for i, p in enumerate(prompts)]


@pytest.mark.parametrize("repo", [*FAMILIES, "tiny/qwen2.5-vl"])
def test_mixed_batch_with_chunked_prefill_matches_generate(repos, references, repo):
    # 13 tokens a step: every image prompt is prefilled in several chunks, some of which cut an image.
    loaded = make_engine(repo, max_num_batched_tokens=13)
    prompts = prompts_of(repo, repos[repo], references[repo])
    expected = [hf_greedy_with_images(references[repo], p, 10) for p in prompts]

    outputs = generate(loaded.core, loaded.runner, requests(prompts, 10))
    assert [outputs[str(i)] for i in range(len(prompts))] == expected
    # The vision tower ran once per image, not once per chunk.
    assert loaded.runner.multimodal.num_encoder_runs == 4
    assert loaded.core.block_manager.num_free_blocks == loaded.core.block_manager.num_blocks


@pytest.mark.parametrize("repo", FAMILIES)
def test_prefix_cache_keys_include_the_image(repos, references, repo):
    """The same text with another image of the same size: identical token ids, so only the image's hash
    keeps the second request from reusing the first one's KV blocks."""
    loaded = make_engine(repo)
    model, path = references[repo], repos[repo]
    text = "Describe this image in great detail, please, with many words about what you see. " * 2
    first = Prompt(path, model, template_parts(text, 1), (random_image(10, (150, 150)),))
    other = Prompt(path, model, template_parts(text, 1), (random_image(11, (150, 150)),))
    assert first.ids == other.ids and len(first.ids) > 48
    image = first.multimodal.images[0]
    assert image.length >= 16  # the image fills at least one whole KV block

    def run(prompt: Prompt, request_id: str) -> tuple[list[int], int]:
        request = Request(request_id, prompt.ids, greedy(8), seed=0, eos_token_ids=EOS, multimodal=prompt.multimodal)
        return generate(loaded.core, loaded.runner, [request])[request_id], request.num_cached_tokens

    out_first, _ = run(first, "a")
    out_other, cached_other = run(other, "b")
    assert out_other == hf_greedy_with_images(model, other, 8) != out_first
    assert cached_other == image.offset // 16 * 16  # the blocks before the image only
    out_again, cached_again = run(Prompt(path, model, template_parts(text, 1), (random_image(10, (150, 150)),)), "c")
    assert out_again == out_first == hf_greedy_with_images(model, first, 8)
    assert cached_again == (len(first.ids) - 1) // 16 * 16  # everything, image included
    assert loaded.runner.multimodal.num_encoder_runs == 2  # the repeated image hit the encoder cache


@pytest.mark.parametrize("repo", FAMILIES)
def test_preemption_and_encoder_cache_eviction_keep_outputs_exact(repos, references, repo):
    # 14 blocks of 16 tokens cannot hold these five requests and their answers: some are preempted and
    # recomputed from scratch (no prefix cache); an encoder cache that keeps nothing makes the vision
    # tower run again for every chunk that covers an image, recomputed ones included.
    loaded = make_engine(repo, num_kv_blocks=14, max_num_batched_tokens=24)
    loaded.core.block_manager.enable_prefix_caching = False
    loaded.runner.multimodal.max_cached_rows = 0
    prompts = prompts_of(repo, repos[repo], references[repo])[::-1]  # image requests last: the first victims
    outputs = generate(loaded.core, loaded.runner, requests(prompts, 24))
    assert loaded.core.scheduler.num_preemptions > 0
    assert [outputs[str(i)] for i in range(len(prompts))] == [hf_greedy_with_images(references[repo], p, 24) for p in prompts]
    assert loaded.runner.multimodal.num_encoder_runs > 4
    assert loaded.core.block_manager.num_free_blocks == 14
