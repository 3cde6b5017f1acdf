"""POST /v1/responses against a live server: the plain Response, the event stream checked event by event
with the openai SDK's own event types, function calls and reasoning items, input items going back in."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest
from openai.types.responses import (
    ResponseCompletedEvent, ResponseContentPartAddedEvent, ResponseContentPartDoneEvent, ResponseCreatedEvent,
    ResponseFunctionCallArgumentsDeltaEvent, ResponseFunctionCallArgumentsDoneEvent, ResponseInProgressEvent,
    ResponseIncompleteEvent, ResponseOutputItemAddedEvent, ResponseOutputItemDoneEvent, ResponseReasoningTextDeltaEvent,
    ResponseReasoningTextDoneEvent, ResponseTextDeltaEvent, ResponseTextDoneEvent,
)

from openai_server import async_sdk_client, client, post, server  # noqa: F401 (fixtures)

FUNCTIONS = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}},
             {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}]


def test_plain_response_matches_chat(client):
    response = client.responses.create(model="tiny/llama", input="Tell me a story.", instructions="Be brief.",
                                       max_output_tokens=6, temperature=0, metadata={"run": "1"})
    chat = client.chat.completions.create(model="tiny/llama", max_tokens=6, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}])
    assert response.object == "response" and response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens and response.usage.output_tokens == 6
    assert response.metadata == {"run": "1"} and response.model == "tiny/llama"
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"


def test_stream_event_by_event_with_the_sdk_types(client):
    events = list(client.responses.create(model="tiny/llama", input=[{"role": "user", "content": "Hi"}],
                                          max_output_tokens=5, temperature=0, stream=True, top_logprobs=2,
                                          include=["message.output_text.logprobs"]))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [type(e) for e in events]
    assert kinds[:5] == [ResponseCreatedEvent, ResponseInProgressEvent, ResponseOutputItemAddedEvent,
                         ResponseContentPartAddedEvent, ResponseTextDeltaEvent]
    assert kinds[-4:] == [ResponseTextDoneEvent, ResponseContentPartDoneEvent, ResponseOutputItemDoneEvent,
                          ResponseIncompleteEvent]
    assert events[0].response.status == "queued" and events[1].response.status == "in_progress"
    deltas = [e for e in events if isinstance(e, ResponseTextDeltaEvent)]
    text = "".join(d.delta for d in deltas)
    assert events[-4].text == text and events[-3].part.text == text
    assert sum(len(d.logprobs) for d in deltas) == 5 and all(len(lp.top_logprobs) == 2 for d in deltas for lp in d.logprobs)
    final = events[-1].response
    assert final.output_text == text and final.usage.output_tokens == 5
    assert {d.item_id for d in deltas} == {events[2].item.id} == {final.output[0].id}


def test_function_calls_and_reasoning_items(client):
    kwargs = dict(model="rig/hermes", input="Weather and time in Paris?", tools=FUNCTIONS, max_output_tokens=100)
    response = client.responses.create(**kwargs)
    assert response.status == "completed"
    kinds = [item.type for item in response.output]
    assert kinds == ["reasoning", "message", "function_call", "function_call"]
    assert response.output[0].content[0].text == "I should call tools."
    assert response.output_text == "Let me check."
    calls = [item for item in response.output if item.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    assert all(c.call_id.startswith("call_") and c.status == "completed" for c in calls)
    assert response.usage.output_tokens_details.reasoning_tokens > 0

    events = list(client.responses.create(**kwargs, stream=True))
    added = [e.item.type for e in events if isinstance(e, ResponseOutputItemAddedEvent)]
    assert added == kinds
    assert "".join(e.delta for e in events if isinstance(e, ResponseReasoningTextDeltaEvent)) == "I should call tools."
    assert [e.text for e in events if isinstance(e, ResponseReasoningTextDoneEvent)] == ["I should call tools."]
    argument_deltas = [e for e in events if isinstance(e, ResponseFunctionCallArgumentsDeltaEvent)]
    assert len({e.output_index for e in argument_deltas}) == 2 and len(argument_deltas) > 2
    done = [json.loads(e.arguments) for e in events if isinstance(e, ResponseFunctionCallArgumentsDoneEvent)]
    assert done == [{"city": "Paris"}, {"zone": "CET"}]
    assert isinstance(events[-1], ResponseCompletedEvent)
    assert [i.type for i in events[-1].response.output] == kinds


def test_sdk_stream_helper_and_async_client(server):
    async def run():
        async with async_sdk_client(server.base_url) as aclient:
            async with aclient.responses.stream(model="rig/llama3", input="Weather in Paris?", tools=FUNCTIONS,
                                                max_output_tokens=60) as stream:
                async for _ in stream:
                    pass
                return await stream.get_final_response()

    final = asyncio.run(run())
    [call] = final.output
    assert call.type == "function_call" and call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}


def test_function_call_outputs_go_back_in(client):
    response = client.responses.create(model="tiny/toolchat", tools=FUNCTIONS, max_output_tokens=2, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call", "call_id": "call_9", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_9", "output": "Sunny"},
    ])
    chat = client.chat.completions.create(model="tiny/toolchat", max_tokens=2, tools=[
        {"type": "function", "function": {k: v for k, v in f.items() if k != "type"}} for f in FUNCTIONS], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_9", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_9", "content": "Sunny"}])
    assert response.usage.input_tokens == chat.usage.prompt_tokens


@pytest.mark.parametrize("body, param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nonsense"}}}}, "text.format.schema"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"truncation": "auto"}, "truncation"),
    ({"background": True}, "background"),
    ({"include": ["file_search_call.results"]}, "include"),
    ({"n": 2}, "n"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
    ({"input": []}, "input"),
])
def test_unsupported_fields_are_400s_that_name_them(server, body, param):
    response = post(server, "/v1/responses", {"model": "tiny/llama", "input": "Hi", "max_output_tokens": 2, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_ignored_fields_are_accepted(client):
    response = client.responses.create(model="tiny/llama", input="Hi", max_output_tokens=2, store=True, user="u",
                                       service_tier="auto", prompt_cache_key="k", safety_identifier="s", max_tool_calls=3,
                                       reasoning={"effort": "low", "summary": "auto"}, truncation="disabled",
                                       text={"format": {"type": "text"}, "verbosity": "low"}, parallel_tool_calls=False)
    assert response.usage.output_tokens == 2 and response.store is False
