"""Tool calls and thoughts end to end: rigged tiny models (see openai_server.py) write the Hermes,
Llama 3 JSON and Mistral formats; the openai SDK must get tool_calls with the right names and JSON
arguments, streamed and not, and the thoughts in reasoning_content."""

from __future__ import annotations

import asyncio
import json

import pytest

from openai_server import WEATHER_TOOLS, async_sdk_client, client, post, server  # noqa: F401 (fixtures)

ASK = [{"role": "user", "content": "What's the weather in Paris, and the time there?"}]
PARIS = {"city": "Paris"}


def _streamed(chunks) -> tuple[str, str, list[dict], str | None]:
    """Content, reasoning, tool calls and finish reason put together from chat chunks, as a client would."""
    content, reasoning, calls, finish = "", "", [], None
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            reasoning += getattr(delta, "reasoning_content", None) or ""
            for call in delta.tool_calls or []:
                if call.id is not None:
                    assert call.index == len(calls) and call.function.name and call.type == "function"
                    calls.append({"id": call.id, "name": call.function.name, "arguments": ""})
                calls[call.index]["arguments"] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, reasoning, calls, finish


@pytest.mark.parametrize("model", ["rig/hermes", "rig/llama3", "rig/mistral"])
def test_each_format_gives_tool_calls_streamed_and_not(client, model):
    kwargs = dict(model=model, messages=ASK, tools=WEATHER_TOOLS, max_tokens=100, temperature=0)
    reply = client.chat.completions.create(**kwargs)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls[0].function.name == "get_weather" and message.tool_calls[0].type == "function"
    assert json.loads(message.tool_calls[0].function.arguments) == PARIS
    assert message.tool_calls[0].id.startswith("call_")
    content, _, calls, finish = _streamed(client.chat.completions.create(**kwargs, stream=True))
    assert finish == "tool_calls"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == \
        [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]
    assert content == (message.content or "")
    if model != "rig/hermes":
        assert message.content is None and len(calls) == 1


def test_hermes_parallel_calls_thoughts_and_text(client):
    reply = client.chat.completions.create(model="rig/hermes", messages=ASK, tools=WEATHER_TOOLS, max_tokens=100)
    message = reply.choices[0].message
    assert message.content == "Let me check."
    assert message.reasoning_content == "I should call tools."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == \
        [("get_weather", PARIS), ("get_time", {"zone": "CET"})]
    assert len({c.id for c in message.tool_calls}) == 2
    assert 0 < reply.usage.completion_tokens_details.reasoning_tokens < reply.usage.completion_tokens


def test_streamed_deltas_send_id_and_name_first_then_argument_fragments(client):
    chunks = list(client.chat.completions.create(model="rig/hermes", messages=ASK, tools=WEATHER_TOOLS, max_tokens=100,
                                                 stream=True))
    deltas = [call for c in chunks for ch in c.choices for call in (ch.delta.tool_calls or [])]
    first = deltas[0]
    assert first.id and first.function.name == "get_weather" and first.function.arguments == ""
    fragments = [d.function.arguments for d in deltas if d.index == 0 and d.id is None]
    assert len(fragments) > 1 and json.loads("".join(fragments)) == PARIS  # arguments arrive as the model writes them
    content, reasoning, calls, _ = _streamed(chunks)
    assert (content, reasoning, len(calls)) == ("Let me check.", "I should call tools.", 2)


def test_parallel_tool_calls_false_ends_after_the_first_call(client):
    reply = client.chat.completions.create(model="rig/hermes", messages=ASK, tools=WEATHER_TOOLS, max_tokens=100,
                                           parallel_tool_calls=False)
    assert [c.function.name for c in reply.choices[0].message.tool_calls] == ["get_weather"]
    assert reply.choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_and_no_tools_leave_the_text_alone(client):
    for extra in ({"tools": WEATHER_TOOLS, "tool_choice": "none"}, {}):
        reply = client.chat.completions.create(model="rig/hermes", messages=ASK, max_tokens=100, **extra)
        message = reply.choices[0].message
        assert message.tool_calls is None and reply.choices[0].finish_reason == "stop"
        assert message.content.startswith("Let me check.<tool_call>") and message.reasoning_content == "I should call tools."


def test_async_sdk_stream_helper_accumulates_tool_calls(server):
    async def run():
        async with async_sdk_client(server.base_url) as aclient:
            async with aclient.chat.completions.stream(model="rig/mistral", messages=ASK, tools=WEATHER_TOOLS,
                                                       max_tokens=100) as stream:
                async for _ in stream:
                    pass
                return await stream.get_final_completion()

    final = asyncio.run(run())
    call = final.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == PARIS


def test_tool_calls_and_results_go_back_through_the_chat_template(server, client):
    from transformers import AutoTokenizer

    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"}]
    reply = client.chat.completions.create(model="tiny/toolchat", messages=messages, tools=WEATHER_TOOLS, max_tokens=2)
    # What the template must have seen: the arguments as a mapping, the result with its call id, the tools.
    tokenizer = AutoTokenizer.from_pretrained(server_snapshot("tiny/toolchat"))
    as_template = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {**call, "function": {"name": "get_weather", "arguments": PARIS}}]}, messages[2]]
    text = tokenizer.apply_chat_template(as_template, tools=WEATHER_TOOLS, add_generation_prompt=True, tokenize=False)
    assert "<tool_call>get_weather(Paris)</tool_call>" in text and "[call_1] Sunny" in text and "Tools: get_weather get_time" in text
    assert reply.usage.prompt_tokens == len(tokenizer(text, add_special_tokens=False)["input_ids"])
    bad = post(server, "/v1/chat/completions", {"model": "tiny/llama", "max_tokens": 1, "messages": [
        *ASK, {"role": "assistant", "tool_calls": [{**call, "function": {"name": "f", "arguments": "{oops"}}]}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages[1].tool_calls[0].function.arguments"


def test_a_prompt_that_opens_a_thought_makes_the_answer_a_thought(client):
    kwargs = dict(model="tiny/toolchat", messages=ASK, max_tokens=6, temperature=0)
    thinking = client.chat.completions.create(**kwargs, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    plain = client.chat.completions.create(**kwargs)
    assert thinking.choices[0].message.reasoning_content and not thinking.choices[0].message.content
    assert thinking.usage.completion_tokens_details.reasoning_tokens == 6
    assert plain.choices[0].message.content and getattr(plain.choices[0].message, "reasoning_content", None) is None


def server_snapshot(repo_id: str):
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, local_files_only=True)
