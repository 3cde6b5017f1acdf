"""POST /v1/completions against a live server: prompts as text and token ids, lists of them, n, echo,
logprobs, streaming, and the fields it refuses."""

from __future__ import annotations

import asyncio

import pytest

from openai_server import async_sdk_client, client, post, server  # noqa: F401 (fixtures)


def test_prompt_list_times_n_and_usage(client, tokenizer):
    prompts = ["Once upon a time", "The sea is"]
    reply = client.completions.create(model="tiny/llama", prompt=prompts, max_tokens=4, n=2, temperature=0.7, seed=1)
    assert reply.object == "text_completion" and [c.index for c in reply.choices] == [0, 1, 2, 3]
    single = [client.completions.create(model="tiny/llama", prompt=p, max_tokens=4, temperature=0) for p in prompts]
    prompt_tokens = sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    assert reply.usage.prompt_tokens == prompt_tokens == sum(s.usage.prompt_tokens for s in single)
    assert reply.usage.completion_tokens == 16
    assert all(c.finish_reason == "length" for c in reply.choices)


def test_token_id_prompts_and_echo(client, tokenizer):
    text = "The sea is"
    ids = tokenizer(text)["input_ids"]
    by_text = client.completions.create(model="tiny/llama", prompt=text, max_tokens=5, temperature=0)
    by_ids = client.completions.create(model="tiny/llama", prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    echoed = client.completions.create(model="tiny/llama", prompt=[text, text], max_tokens=5, temperature=0, echo=True)
    assert [c.text for c in echoed.choices] == [text + by_text.choices[0].text] * 2
    nested = client.completions.create(model="tiny/llama", prompt=[ids, ids[:2]], max_tokens=2, temperature=0)
    assert len(nested.choices) == 2


def test_logprobs_legacy_shape(client):
    reply = client.completions.create(model="tiny/llama", prompt="Once", max_tokens=4, temperature=0, logprobs=3)
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == reply.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    assert all(len(top) == 3 and max(top.values()) == pytest.approx(tl) for top, tl in zip(lp.top_logprobs, lp.token_logprobs))


def test_streaming_sync_and_async(server, client):
    plain = client.completions.create(model="tiny/llama", prompt="Once", max_tokens=6, temperature=0, logprobs=1)
    chunks = list(client.completions.create(model="tiny/llama", prompt="Once", max_tokens=6, temperature=0, logprobs=1,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert [t for c in chunks if c.choices for t in c.choices[0].logprobs.tokens] == plain.choices[0].logprobs.tokens
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-2].choices[0].finish_reason == "length"

    async def run():
        async with async_sdk_client(server.base_url) as aclient:
            stream = await aclient.completions.create(model="tiny/llama", prompt="Once", max_tokens=6, temperature=0,
                                                      echo=True, stream=True)
            return "".join([c.choices[0].text async for c in stream])

    assert asyncio.run(run()) == "Once" + plain.choices[0].text


def test_max_tokens_defaults_to_16(client):
    assert client.completions.create(model="tiny/llama", prompt="Once", temperature=0).usage.completion_tokens == 16


@pytest.mark.parametrize("body, param", [
    ({"suffix": "the end"}, "suffix"),
    ({"echo": True, "logprobs": 2}, "echo"),
    ({"best_of": 3}, "best_of"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"logprobs": 50}, "logprobs"),
    ({"messages": []}, "messages"),
])
def test_refused_fields_name_themselves(server, body, param):
    response = post(server, "/v1/completions", {"model": "tiny/llama", "prompt": "Once", "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_accepted_best_of_and_user(client):
    reply = client.completions.create(model="tiny/llama", prompt="Once", max_tokens=2, n=2, best_of=2, user="me")
    assert len(reply.choices) == 2
