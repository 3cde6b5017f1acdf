"""A live `transerve serve` answers real clients: the openai SDK, huggingface_hub, plain HTTP."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from conftest import LiveServer, hf_greedy, hf_reference_model
from openai_server import async_sdk_client, check_body, checked, sdk_client


@pytest.fixture(scope="module")
def server(tiny_repos):
    """No pinned model: each request's `model` is loaded from the HF cache on first use."""
    srv = LiveServer("--no-preload", "--num-kv-blocks", "256", "--max-num-batched-tokens", "128")
    # Load both tiny models up front so tests time their answers, not their loading.
    for repo in ("tiny/llama", "tiny/qwen2"):
        httpx.post(srv.base_url + "/v1/chat/completions", timeout=120,
                   json={"model": repo, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture()
def client(server):
    return sdk_client(server.base_url)


def test_chat_completion_matches_generate_and_reports_usage(server, client, tiny_repos, tokenizer):
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    reply = client.chat.completions.create(model="tiny/llama", messages=messages, max_tokens=12, temperature=0)
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    expected = hf_greedy(hf_reference_model(tiny_repos["tiny/llama"]), prompt_ids, 12)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == tokenizer.decode(expected, skip_special_tokens=True)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == 12
    assert reply.model == "tiny/llama"
    assert reply.object == "chat.completion"


def test_streaming_chunks_are_shaped_like_openai(client):
    chunks = list(client.chat.completions.create(
        model="tiny/qwen2", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hello"}]}],
        max_completion_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True},
    ))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert len({c.id for c in chunks}) == 1
    plain = client.chat.completions.create(
        model="tiny/qwen2", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_tokens=10, temperature=0,
    )
    assert "".join(content) == plain.choices[0].message.content


def test_raw_sse_ends_with_done(server):
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny/llama", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True,
    }) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    check_body("/v1/chat/completions", 200, "text/event-stream", "\n".join(lines))
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_stop_strings_are_not_shown_and_finish_with_stop(client):
    full = client.chat.completions.create(model="tiny/llama", messages=[{"role": "user", "content": "Go"}], max_tokens=16, temperature=0)
    text = full.choices[0].message.content
    stop = text[5:8]  # spans whatever token boundaries lie there
    cut = client.chat.completions.create(model="tiny/llama", messages=[{"role": "user", "content": "Go"}], max_tokens=16,
                                         temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="tiny/llama", messages=[{"role": "user", "content": "Go"}], max_tokens=16,
                                              temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[: text.index(stop)]


def test_same_seed_same_answer(client):
    kwargs = dict(model="tiny/qwen2", messages=[{"role": "user", "content": "Pick words"}], max_tokens=12, temperature=1.0, seed=7)
    assert client.chat.completions.create(**kwargs).choices[0].message.content == \
        client.chat.completions.create(**kwargs).choices[0].message.content


def test_concurrent_requests_each_get_their_own_greedy_answer(server, client):
    prompts = [f"Question number {i}: " + "why? " * i for i in range(8)]
    expected = [client.chat.completions.create(model="tiny/llama", messages=[{"role": "user", "content": p}], max_tokens=8,
                                               temperature=0).choices[0].message.content for p in prompts]

    async def ask_all():
        async with async_sdk_client(server.base_url) as aclient:
            replies = await asyncio.gather(*[
                aclient.chat.completions.create(model="tiny/llama", messages=[{"role": "user", "content": p}], max_tokens=8, temperature=0)
                for p in prompts
            ])
        return [r.choices[0].message.content for r in replies]

    assert asyncio.run(ask_all()) == expected


def test_huggingface_hub_async_inference_client(server, monkeypatch):
    from huggingface_hub import AsyncInferenceClient, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # offline mode blocks every URL, ours too

    async def ask():
        client = AsyncInferenceClient(base_url=server.base_url)
        reply = await client.chat_completion(messages=[{"role": "user", "content": "Hi"}], model="tiny/llama", max_tokens=5)
        streamed = [chunk.choices[0].delta.content async for chunk in await client.chat_completion(
            messages=[{"role": "user", "content": "Hi"}], model="tiny/llama", max_tokens=5, stream=True, temperature=0) if chunk.choices]
        return reply, streamed

    reply, streamed = asyncio.run(ask())
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 5
    assert len("".join(s for s in streamed if s)) > 0


def test_models_lists_the_cache_and_marks_loaded(server, client):
    ids = {m.id: m for m in client.models.list().data}
    assert {"tiny/llama", "tiny/qwen2"} <= set(ids)
    assert client.models.retrieve("tiny/llama").id == "tiny/llama"
    assert httpx.get(server.base_url + "/v1/models/tiny/llama").json()["loaded"] is True
    assert httpx.get(server.base_url + "/health").status_code == 200


def test_models_lists_the_pinned_local_model_first(tiny_repos):
    """Clients often take the first id of /v1/models: with MODEL pinned, that is the model served, even
    when it is a local directory that sorts after the cached repos."""
    pinned = str(tiny_repos["tiny/qwen2"])
    srv = LiveServer(pinned, "--num-kv-blocks", "64")
    try:
        data = httpx.get(srv.base_url + "/v1/models", timeout=10).json()["data"]
        assert data[0]["id"] == pinned and data[0]["loaded"] is True
        assert {"tiny/llama", "tiny/qwen2"} <= {m["id"] for m in data[1:]}
    finally:
        assert srv.stop() == 0, srv.output()


@pytest.mark.parametrize("body, status, param", [
    ("{not json", 400, None),
    ({"model": "tiny/llama"}, 400, "messages"),
    ({"model": "tiny/llama", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"model": "tiny/llama", "messages": [{"role": "user", "content": "x"}], "temperature": 5}, 400, "temperature"),
    ({"model": "tiny/llama", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "nobody/nothing", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ({"model": "../../etc", "messages": [{"role": "user", "content": "x"}]}, 404, "model"),
    ({"model": "tiny/llama", "messages": [{"role": "user", "content": "word " * 1100}]}, 400, "messages"),
    ({"model": "tiny/llama", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}, 400, "max_tokens"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    data = body if isinstance(body, str) else json.dumps(body)
    response = checked(httpx.post(server.base_url + "/v1/chat/completions", content=data, timeout=60,
                                  headers={"content-type": "application/json"}))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    assert error["param"] == param


def test_a_bad_request_does_not_disturb_one_in_flight(server, client):
    async def run():
        async with async_sdk_client(server.base_url) as aclient:
            good = asyncio.create_task(aclient.chat.completions.create(
                model="tiny/llama", messages=[{"role": "user", "content": "Count"}], max_tokens=30, temperature=0))
            with pytest.raises(openai.BadRequestError):
                await aclient.chat.completions.create(model="tiny/llama", messages=[{"role": "user", "content": "x " * 2000}])
            return await good

    reply = asyncio.run(run())
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 30
