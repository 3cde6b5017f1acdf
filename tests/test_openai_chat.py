"""Chat completions field by field against a live server: n, logprobs, penalties, logit_bias,
generation_config, accepted-and-ignored and rejected fields; the openai SDK sync, async and streaming,
and huggingface_hub's AsyncInferenceClient."""

from __future__ import annotations

import asyncio
import json
import pytest

from openai_server import async_sdk_client, client, post, server  # noqa: F401 (fixtures)

HI = [{"role": "user", "content": "Tell me a story."}]


def test_n_choices_with_a_seed_are_reproducible_and_counted(client):
    kwargs = dict(model="tiny/llama", messages=HI, max_tokens=6, temperature=1.0, seed=11, n=3)
    first, again = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]
    assert len(set(texts)) > 1  # each choice draws its own tokens
    assert first.usage.completion_tokens == 18
    single = client.chat.completions.create(**{**kwargs, "n": 1})
    assert first.usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counts once


def test_logprobs_and_top_logprobs(client):
    reply = client.chat.completions.create(model="tiny/llama", messages=HI, max_tokens=5, temperature=0, logprobs=True,
                                           top_logprobs=3)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == 5 and "".join(e.token for e in entries) == reply.choices[0].message.content
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert bytes(entry.bytes).decode() == entry.token
    plain = client.chat.completions.create(model="tiny/llama", messages=HI, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == reply.choices[0].message.content


def test_penalties_stop_a_favoured_token_from_repeating(client, tokenizer):
    # +1.5 is more than the tiny model's logits spread: greedy says " banana" every time, until penalised.
    banana = tokenizer(" banana", add_special_tokens=False)["input_ids"][0]
    kwargs = dict(model="tiny/llama", messages=HI, max_tokens=8, temperature=0, logit_bias={str(banana): 1.5})
    assert client.chat.completions.create(**kwargs).choices[0].message.content == " banana" * 8
    for extra in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0}, {"extra_body": {"repetition_penalty": 5.0}},
                  {"extra_body": {"generation_config": {"repetition_penalty": 5.0}}}):
        text = client.chat.completions.create(**kwargs, **extra).choices[0].message.content
        assert text.startswith(" banana") and text.count(" banana") == 1, (extra, text)


def test_logit_bias_steers_every_token(client, tokenizer):
    banana, apple = (tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" banana", " apple"))
    kwargs = dict(model="tiny/llama", messages=HI, max_tokens=4, temperature=0)
    reply = client.chat.completions.create(**kwargs, logit_bias={str(banana): 100, str(apple): 99})
    assert reply.choices[0].message.content == tokenizer.decode([banana] * 4)
    reply = client.chat.completions.create(**kwargs, logit_bias={str(banana): -100, str(apple): 99})
    assert reply.choices[0].message.content == tokenizer.decode([apple] * 4)


@pytest.mark.parametrize("as_string", [False, True])
def test_generation_config_object_or_json_string(client, as_string):
    config = {"max_new_tokens": 3, "do_sample": False, "no_repeat_ngram_size": 1}
    reply = client.chat.completions.create(model="tiny/llama", messages=HI, logprobs=True,
                                           extra_body={"generation_config": json.dumps(config) if as_string else config})
    tokens = [e.token for e in reply.choices[0].logprobs.content]
    assert reply.usage.completion_tokens == 3 and len(set(tokens)) == 3  # no token twice: no 1-gram repeats


@pytest.mark.parametrize("body, param", [
    ({"generation_config": {"num_beams": 4}}, "generation_config.num_beams"),
    ({"generation_config": "{not json"}, "generation_config"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
    ({"tool_choice": "required"}, "tool_choice"),  # no tools to call
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logit_bias": {"99999999": 5}}, "logit_bias"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"n": 0}, "n"),
])
def test_unsupported_fields_are_400s_that_name_them(server, body, param):
    response = post(server, "/v1/chat/completions", {"model": "tiny/llama", "messages": HI, "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_ignored_fields_are_accepted(client):
    reply = client.chat.completions.create(
        model="tiny/llama", messages=HI, max_tokens=2, user="u-1", metadata={"k": "v"}, store=False, service_tier="auto",
        prompt_cache_key="abc", safety_identifier="s", verbosity="low", parallel_tool_calls=True, response_format={"type": "text"},
        reasoning_effort="low", stream_options=None, prediction={"type": "content", "content": "x"},
    )
    assert reply.usage.completion_tokens == 2


def test_async_streaming_n_choices_with_logprobs(server):
    async def run():
        async with async_sdk_client(server.base_url) as aclient:
            stream = await aclient.chat.completions.create(
                model="tiny/llama", messages=HI, max_tokens=5, temperature=0.8, seed=3, n=2, logprobs=True, top_logprobs=2,
                stream=True, stream_options={"include_usage": True})
            chunks = [c async for c in stream]
            plain = await aclient.chat.completions.create(model="tiny/llama", messages=HI, max_tokens=5, temperature=0.8,
                                                          seed=3, n=2)
        return chunks, plain

    chunks, plain = asyncio.run(run())
    texts, finishes, logprobs = ["", ""], [None, None], [[], []]
    for chunk in chunks[:-1]:
        choice = chunk.choices[0]
        texts[choice.index] += choice.delta.content or ""
        finishes[choice.index] = choice.finish_reason or finishes[choice.index]
        if choice.logprobs is not None:
            logprobs[choice.index] += choice.logprobs.content
    assert texts == [c.message.content for c in plain.choices]
    assert finishes == ["length", "length"] and [len(lp) for lp in logprobs] == [5, 5]
    assert all(len(e.top_logprobs) == 2 for lp in logprobs for e in lp)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_huggingface_hub_async_client_with_sampling_fields(server, monkeypatch):
    from huggingface_hub import AsyncInferenceClient, constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # offline mode blocks every URL, ours too
    kwargs = dict(messages=HI, model="tiny/llama", max_tokens=4, seed=5, temperature=0.9, frequency_penalty=0.5,
                  presence_penalty=0.5, logprobs=True, top_logprobs=2, stop=["\n\n\n\n"])

    async def ask():
        client = AsyncInferenceClient(base_url=server.base_url)
        reply = await client.chat_completion(**kwargs)
        streamed = [chunk async for chunk in await client.chat_completion(**kwargs, stream=True)]
        return reply, streamed

    reply, streamed = asyncio.run(ask())
    assert reply.choices[0].finish_reason == "length" and len(reply.choices[0].logprobs.content) == 4
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == reply.choices[0].message.content
