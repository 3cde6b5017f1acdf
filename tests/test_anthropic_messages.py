"""POST /v1/messages and /v1/messages/count_tokens through the `anthropic` SDK, on the live server the
test_openai_* modules share (openai_server.py): the answers match chat's for the same conversation,
streams replay into the same Message, tool use goes round trip, and every body read is validated against
the anthropic package's own types (Message, the raw stream events, ErrorResponse)."""

from __future__ import annotations

import json

import anthropic
import httpx
import httpx2  # the anthropic SDK's own HTTP client (httpx's successor)
import jsonschema
import pytest
from anthropic.types import Message, MessageTokensCount, RawMessageStreamEvent
from anthropic.types.shared import ErrorResponse
from pydantic import TypeAdapter

from conftest import LiveServer
from openai_server import client, server  # noqa: F401 (fixtures)
from test_openai_tools import server_snapshot

ASK = [{"role": "user", "content": "What's the weather in Paris, and the time there?"}]
TOOLS = [{"name": "get_weather", "description": "Weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}},
         {"name": "get_time", "description": "Time in a zone",
          "input_schema": {"type": "object", "properties": {"zone": {"type": "string"}}}}]
GREEDY = {"temperature": 0}  # not a keyword of the newest SDK's create(); older SDKs and Claude Code send it
_EVENT = TypeAdapter(RawMessageStreamEvent)


def check_anthropic(response: httpx.Response | httpx2.Response) -> None:
    """Raises pydantic's ValidationError when a body is not what the anthropic package says it is."""
    response.read()
    kind, path = response.headers.get("content-type", ""), response.request.url.path
    if kind.startswith("text/event-stream"):
        for block in response.text.split("\n\n"):
            lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
            if "data" in lines:
                data = json.loads(lines["data"])
                assert data["type"] == lines["event"]  # the SDK dispatches on the event line
                if data["type"] == "error":
                    ErrorResponse.model_validate(data)
                else:
                    _EVENT.validate_python(data)
    elif response.status_code >= 400:
        ErrorResponse.model_validate(response.json())
    elif path.endswith("/count_tokens"):
        MessageTokensCount.model_validate(response.json())
    else:
        Message.model_validate(response.json())


def anthropic_client(base_url: str, api_key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=base_url, api_key=api_key, max_retries=0,
                               http_client=httpx2.Client(timeout=120, event_hooks={"response": [check_anthropic]}))


@pytest.fixture()
def claude(server):
    return anthropic_client(server.base_url)


def dumped(content) -> list[dict]:
    """Content blocks as plain data (the stream helper's blocks are Parsed* subclasses with a parsed_output)."""
    return [{k: v for k, v in block.to_dict().items() if k != "parsed_output"} for block in content]


def prompt_tokens(usage) -> int:
    return usage.input_tokens + usage.cache_read_input_tokens


def test_plain_message_matches_chat_and_counts_its_tokens(claude, client):
    kwargs = dict(model="tiny/llama", max_tokens=6, system="Be brief.", messages=[{"role": "user", "content": "Tell me a story."}])
    message = claude.messages.create(**kwargs, extra_body=GREEDY)
    chat = client.chat.completions.create(model="tiny/llama", max_tokens=6, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}])
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert [b.type for b in message.content] == ["text"] and message.content[0].text == chat.choices[0].message.content
    assert (message.stop_reason, message.stop_sequence) == ("max_tokens", None)
    assert message.usage.output_tokens == 6 and prompt_tokens(message.usage) == chat.usage.prompt_tokens
    count = claude.messages.count_tokens(model="tiny/llama", system="Be brief.", messages=kwargs["messages"])
    assert count.input_tokens == chat.usage.prompt_tokens


def test_stream_helper_gives_the_same_message(claude, server):
    kwargs = dict(model="tiny/llama", max_tokens=6, messages=[{"role": "user", "content": "Tell me a story."}])
    plain = claude.messages.create(**kwargs, extra_body=GREEDY)
    with claude.messages.stream(**kwargs, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == plain.content[0].text and dumped(final.content) == dumped(plain.content)
    assert (final.stop_reason, final.usage.output_tokens) == ("max_tokens", 6)
    assert prompt_tokens(final.usage) == prompt_tokens(plain.usage)
    with httpx.stream("POST", server.base_url + "/v1/messages", json={**kwargs, **GREEDY, "stream": True}, timeout=120) as raw:
        events = [line[7:] for line in raw.iter_lines() if line.startswith("event: ")]
    assert events[:2] == ["message_start", "content_block_start"] and events[-3:] == ["content_block_stop", "message_delta",
                                                                                      "message_stop"]
    assert set(events[2:-3]) == {"content_block_delta"}


def test_tool_use_thinking_and_text_blocks_streamed_and_not(claude):
    kwargs = dict(model="rig/hermes", max_tokens=100, messages=ASK, tools=TOOLS)
    message = claude.messages.create(**kwargs)
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use", "tool_use"]
    assert message.content[0].thinking == "I should call tools." and message.content[1].text == "Let me check."
    assert [(b.name, b.input) for b in message.content[2:]] == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    assert message.stop_reason == "tool_use" and len({b.id for b in message.content[2:]}) == 2
    with claude.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    assert [{k: v for k, v in b.items() if k != "id"} for b in dumped(final.content)] == \
        [{k: v for k, v in b.items() if k != "id"} for b in dumped(message.content)]
    assert final.stop_reason == "tool_use" and final.content[0].thinking == "I should call tools."
    one = claude.messages.create(**kwargs, tool_choice={"type": "auto", "disable_parallel_tool_use": True})
    assert [b.name for b in one.content if b.type == "tool_use"] == ["get_weather"]
    none = claude.messages.create(**kwargs, tool_choice={"type": "none"})
    assert none.stop_reason == "end_turn" and none.content[-1].text.startswith("Let me check.<tool_call>")


@pytest.mark.parametrize("model", ["tiny/llama", "rig/llama3"])
def test_tool_choice_tool_and_output_format_are_constrained(claude, model):
    zone = {"type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["zone"],
            "additionalProperties": False}
    kwargs = dict(model=model, max_tokens=400, messages=ASK, tool_choice={"type": "tool", "name": "get_time"},
                  tools=[TOOLS[0], {**TOOLS[1], "input_schema": zone}], extra_body={"temperature": 1.0})
    message = claude.messages.create(**kwargs)
    with claude.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    for answer in (message, final):
        calls = [b for b in answer.content if b.type == "tool_use"]
        assert answer.stop_reason == "tool_use" and [c.name for c in calls] == ["get_time"]
        jsonschema.validate(calls[0].input, zone)
    formatted = claude.messages.create(model=model, max_tokens=400, messages=ASK, output_config={"format": {
        "type": "json_schema", "schema": zone}})
    assert formatted.stop_reason == "end_turn"
    jsonschema.validate(json.loads(formatted.content[0].text), zone)


def test_tool_results_go_back_through_the_chat_template(claude):
    from transformers import AutoTokenizer

    conversation = [*ASK, {"role": "assistant", "content": [
        {"type": "text", "text": "Checking."}, {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny, 21 C"},
                                     {"type": "text", "text": "Thanks."}]}]
    message = claude.messages.create(model="tiny/toolchat", max_tokens=2, messages=conversation, tools=TOOLS)
    as_chat = [*ASK, {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny, 21 C"}, {"role": "user", "content": "Thanks."}]
    tools = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                "parameters": t["input_schema"]}} for t in TOOLS]
    tokenizer = AutoTokenizer.from_pretrained(server_snapshot("tiny/toolchat"))
    text = tokenizer.apply_chat_template(as_chat, tools=tools, add_generation_prompt=True, tokenize=False)
    assert "<tool_call>get_weather(Paris)</tool_call>" in text and "[toolu_1] Sunny" in text and "Thanks." in text
    expected = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert prompt_tokens(message.usage) == expected
    assert claude.messages.count_tokens(model="tiny/toolchat", messages=conversation, tools=TOOLS).input_tokens == expected


def test_thinking_switches_the_templates_thought(claude):
    kwargs = dict(model="tiny/toolchat", max_tokens=6, messages=ASK, extra_body=GREEDY)
    thinking = claude.messages.create(**kwargs, thinking={"type": "enabled", "budget_tokens": 1024})
    plain = claude.messages.create(**kwargs, thinking={"type": "disabled"})
    assert [b.type for b in thinking.content] == ["thinking"] and thinking.content[0].thinking
    assert [b.type for b in plain.content] == ["text"] and plain.content[0].text
    with claude.messages.stream(**kwargs, thinking={"type": "enabled", "budget_tokens": 1024}) as stream:
        deltas = [e.delta.type for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert set(deltas) == {"thinking_delta"} and dumped(final.content) == dumped(thinking.content)


def test_stop_sequence_names_the_one_that_matched(claude):
    kwargs = dict(model="rig/hermes", max_tokens=100, messages=ASK, stop_sequences=["nowhere", "check"])
    message = claude.messages.create(**kwargs)
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "check")
    assert message.content[-1].text == "Let me "
    with claude.messages.stream(**kwargs) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence, final.content[-1].text) == ("stop_sequence", "check", "Let me ")
    ended = claude.messages.create(**{**kwargs, "stop_sequences": ["nowhere"]})
    assert (ended.stop_reason, ended.stop_sequence) == ("end_turn", None)


@pytest.mark.parametrize("body, words", [
    ({"messages": [{"role": "user", "content": "x"}]}, "'max_tokens' is required"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
     "'document' is not supported"),
    ({"max_tokens": 5, "messages": [*ASK, {"role": "assistant", "content": "It is"}]}, "prefill is not supported"),
    ({"max_tokens": 5, "messages": ASK, "tool_choice": {"type": "tool"}}, "tool_choice.name"),
    ({"max_tokens": 5, "messages": ASK, "tool_choice": {"type": "tool", "name": "nope"}, "tools": TOOLS}, "not among the tools"),
    ({"max_tokens": 5, "messages": ASK, "temperature": 1.5}, "temperature"),
    ({"max_tokens": 5, "messages": ASK, "mcp_servers": [{"url": "x"}]}, "no MCP connector"),
    ({"max_tokens": 5, "messages": ASK, "best_of": 2}, "unknown field 'best_of'"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "base64", "media_type": "image/png", "data": "AAAA"}}]}]}, "does not accept images"),
    ({"max_tokens": 5000, "messages": [{"role": "user", "content": "x " * 3000}]}, "context"),
])
def test_bad_input_is_an_anthropic_400(claude, body, words):
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.post("/v1/messages", body={"model": "tiny/llama", **body}, cast_to=Message)
    error = info.value.body
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error", error
    assert words in error["error"]["message"]


def test_unknown_model_is_an_anthropic_404(claude):
    with pytest.raises(anthropic.NotFoundError) as info:
        claude.messages.create(model="nobody/nothing", max_tokens=5, messages=ASK)
    assert info.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.count_tokens(model="nobody/nothing", messages=ASK)


def test_api_key_in_x_api_key_or_bearer(tiny_repos):
    srv = LiveServer("tiny/llama", "--api-key", "sesame", "--num-kv-blocks", "32")
    try:
        ask = dict(model="tiny/llama", max_tokens=2, messages=ASK)
        assert anthropic_client(srv.base_url, "sesame").messages.create(**ask).usage.output_tokens == 2
        for key in ("wrong", None):
            headers = {"x-api-key": key} if key else {}
            response = httpx.post(srv.base_url + "/v1/messages", json=ask, headers=headers, timeout=60)
            check_anthropic(response)
            assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
        with pytest.raises(anthropic.AuthenticationError):
            anthropic_client(srv.base_url, "wrong").messages.create(**ask)
        bearer = httpx.post(srv.base_url + "/v1/chat/completions", headers={"Authorization": "Bearer sesame"}, timeout=60,
                            json={"model": "tiny/llama", "max_tokens": 1, "messages": ASK})
        assert bearer.status_code == 200
        openai_shape = httpx.post(srv.base_url + "/v1/chat/completions", headers={"x-api-key": "wrong"}, json={}, timeout=60)
        assert openai_shape.status_code == 401 and openai_shape.json()["error"]["code"] == "invalid_api_key"
    finally:
        assert srv.stop() == 0, srv.output()


def test_a_failure_mid_stream_ends_with_an_error_event():
    import anyio

    from transerve.actors.messages import RequestError, TextDelta
    from transerve.http.messages_stream import MessageStream
    from transerve.http.output import stream

    async def events():
        yield RequestError("model step failed: boom", 500)

    async def run():
        shape = MessageStream({"id": "msg_1", "type": "message", "role": "assistant", "model": "m"})
        return [chunk async for chunk in stream(shape, TextDelta("Hel", (5,)), events())]

    # The stream sends each event's SSE frames in one write: the client reads them frame by frame.
    blocks = [frame for frame in b"".join(anyio.run(run)).decode().split("\n\n") if frame]
    kinds = [block.split("\n", 1)[0].removeprefix("event: ") for block in blocks]
    assert kinds == ["message_start", "content_block_start", "content_block_delta", "error"]
    error = ErrorResponse.model_validate(json.loads(blocks[-1].split("data: ", 1)[1]))
    assert (error.error.type, error.error.message) == ("api_error", "model step failed: boom")
