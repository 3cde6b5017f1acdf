"""Models on demand with --model-timeout: loaded once however many requests ask at the same time,
unloaded when idle, loaded again on the next request; GET /v1/models follows."""

from __future__ import annotations

import asyncio
import time

import httpx

from conftest import LiveServer
from openai_server import async_sdk_client, sdk_client
from transerve.engine import models


def loaded(server, model: str) -> bool:
    return httpx.get(f"{server.base_url}/v1/models/{model}", timeout=10).json()["loaded"]


def test_load_once_unload_when_idle_and_reload(tiny_repos):
    server = LiveServer("--no-preload", "--model-timeout", "3", "--num-kv-blocks", "64")
    try:
        assert not loaded(server, "tiny/qwen2")

        async def ask_many():
            async with async_sdk_client(server.base_url) as client:
                return await asyncio.gather(*[client.chat.completions.create(
                    model="tiny/qwen2", messages=[{"role": "user", "content": f"Hi {i}"}], max_tokens=2) for i in range(4)])

        replies = asyncio.run(ask_many())
        assert all(r.usage.completion_tokens == 2 for r in replies)
        assert server.output().count("loaded tiny/qwen2") == 1
        assert loaded(server, "tiny/qwen2")

        deadline = time.monotonic() + 30
        while loaded(server, "tiny/qwen2") and time.monotonic() < deadline:
            time.sleep(0.3)
        assert not loaded(server, "tiny/qwen2")
        assert "unloading tiny/qwen2" in server.output()
        assert "tiny/qwen2" in {m["id"] for m in httpx.get(server.base_url + "/v1/models").json()["data"]}  # still cached

        again = sdk_client(server.base_url).chat.completions.create(
            model="tiny/qwen2", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        assert again.usage.completion_tokens == 2
        assert server.output().count("loaded tiny/qwen2") == 2
    finally:
        assert server.stop() == 0, server.output()


def test_the_bundled_model_samples_as_its_model_card_says_unless_the_server_overrides(smollm2_dir):
    from transformers import GenerationConfig

    bundled = models.load_generation_config(models.resolve(models.DEFAULT_MODEL))
    defaults = models.generation_defaults(bundled, {})
    assert (defaults["temperature"], defaults["top_p"]) == (0.2, 0.9)
    overridden = models.generation_defaults(bundled, {"temperature": 0.7, "min_p": 0.05})
    assert (overridden["temperature"], overridden["top_p"], overridden["min_p"]) == (0.7, 0.9, 0.05)
    # A model whose config does not ask for sampling gets OpenAI's defaults, or the server's.
    greedy = GenerationConfig(do_sample=False, temperature=0.6)
    assert models.generation_defaults(greedy, {}) == {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}
    assert models.generation_defaults(greedy, {"top_k": 20}) == {"temperature": 1.0, "top_p": 1.0, "top_k": 20, "min_p": 0.0}
