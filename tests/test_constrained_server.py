"""Constrained decoding through the live server with the openai SDK: `parse()` with a pydantic model,
`tool_choice` required and named (chat and Responses, streamed and not, in each tool-call syntax),
vLLM's `structured_outputs`, and bad schemas as 400s that name the field while the server keeps serving.
The models are random or rigged (openai_server.py): whatever they would write, the grammar decides."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from openai_server import client, post, server  # noqa: F401 (fixtures)
from test_openai_tools import _streamed

ASK = [{"role": "user", "content": "Describe a pet as JSON."}]


class Owner(BaseModel):
    name: str = Field(pattern=r"^[A-Z][a-z]{0,8}$")
    verified: bool


class Pet(BaseModel):
    kind: Literal["cat", "dog", "bird"]
    age: int = Field(ge=0, le=30)
    tags: list[Literal["calm", "loud", "old"]] = Field(min_length=1, max_length=3)
    owner: Owner


PLACE = {"type": "object", "properties": {"city": {"enum": ["Paris", "Tokyo", "Lima"]}, "days": {"type": "integer",
         "minimum": 1, "maximum": 9}}, "required": ["city", "days"], "additionalProperties": False}
ZONE = {"type": "object", "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}}, "required": ["zone"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": PLACE}},
         {"type": "function", "function": {"name": "get_time", "parameters": ZONE}}]
SCHEMAS = {"get_weather": PLACE, "get_time": ZONE}


def test_sdk_parse_gives_the_pydantic_object(client):
    for seed in range(4):
        reply = client.chat.completions.parse(model="tiny/llama", messages=ASK, response_format=Pet, temperature=1.0,
                                              max_tokens=150, seed=seed)
        assert reply.choices[0].finish_reason == "stop"
        assert isinstance(reply.choices[0].message.parsed, Pet)


def test_json_object_and_n_choices_each_constrained(client):
    reply = client.chat.completions.create(model="tiny/llama", messages=ASK, temperature=1.0, max_tokens=150, n=3,
                                           response_format={"type": "json_schema", "json_schema": {
                                               "name": "pet", "schema": Pet.model_json_schema(), "strict": False}})
    for choice in reply.choices:
        Pet.model_validate_json(choice.message.content)


def test_max_tokens_mid_object_is_length_with_the_partial_text(client):
    reply = client.chat.completions.create(model="tiny/llama", messages=ASK, max_tokens=4, response_format={
        "type": "json_schema", "json_schema": {"name": "pet", "schema": Pet.model_json_schema()}})
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content.startswith('{"')


def _check_calls(calls: list[tuple[str, str]], only: str | None = None) -> None:
    assert calls
    for name, arguments in calls:
        assert name in SCHEMAS and (only is None or name == only)
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("model", ["tiny/llama", "rig/llama3", "rig/mistral"])
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_tool_choice_calls_validate_streamed_and_not(client, model, tool_choice):
    only = None if tool_choice == "required" else "get_time"
    kwargs = dict(model=model, messages=ASK, tools=TOOLS, tool_choice=tool_choice, max_tokens=400, temperature=1.0)
    for seed in range(3):
        reply = client.chat.completions.create(**kwargs, seed=seed)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        _check_calls([(c.function.name, c.function.arguments) for c in choice.message.tool_calls], only)
        assert all(c.type == "function" and c.id.startswith("call_") for c in choice.message.tool_calls)
        _, _, calls, finish = _streamed(client.chat.completions.create(**kwargs, seed=seed, stream=True))
        assert finish == "tool_calls"  # _streamed checks each first delta's index and type
        _check_calls([(c["name"], c["arguments"]) for c in calls], only)
        if only:
            assert len(calls) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_responses_tool_choice_and_text_format(client, stream):
    tools = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"]} for t in TOOLS]
    named = client.responses.create(model="tiny/llama", input="Weather?", tools=tools, max_output_tokens=120,
                                    tool_choice={"type": "function", "name": "get_weather"}, temperature=1.0)
    calls = [item for item in named.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and named.tool_choice.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), PLACE)
    if stream:
        # Room to finish: where the grammar allows whitespace a random model at temperature 1 can dwell there,
        # and a call cut at max_output_tokens is rightly unfinished JSON (once seen at 120: '{\r"cit').
        events = list(client.responses.create(model="tiny/llama", input="Weather?", tools=tools, max_output_tokens=400,
                                              tool_choice="required", temperature=1.0, stream=True))
        done = [e.item for e in events if e.type == "response.output_item.done" and e.item.type == "function_call"]
        _check_calls([(item.name, item.arguments) for item in done])
    else:
        parsed = client.responses.parse(model="tiny/llama", input="A pet?", text_format=Pet, max_output_tokens=150,
                                        temperature=1.0)
        assert isinstance(parsed.output_parsed, Pet)


def test_structured_outputs_extension_on_chat_and_completions(client):
    colours = ["red", "green", "blue"]
    for seed in range(3):
        chat = client.chat.completions.create(model="tiny/llama", messages=ASK, max_tokens=10, seed=seed,
                                              extra_body={"structured_outputs": {"choice": colours}})
        assert chat.choices[0].message.content in colours
    completion = client.completions.create(model="tiny/llama", prompt="A code:", max_tokens=20, n=4,
                                           extra_body={"structured_outputs": {"regex": "[a-z]{2,4}-[0-9]{2}"}})
    for choice in completion.choices:
        assert choice.finish_reason == "stop" and len(choice.text.split("-")) == 2
    grammar = 'root ::= "yes" | "no" | "maybe " [0-9]'
    # Room for the longest answer even one character a token (a random model takes any tokenization).
    completion = client.completions.create(model="tiny/llama", prompt="Answer:", max_tokens=12,
                                           extra_body={"structured_outputs": {"grammar": grammar}})
    text = completion.choices[0].text
    assert completion.choices[0].finish_reason == "stop", text
    assert text in ("yes", "no") or (text.startswith("maybe ") and text[-1].isdigit())


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema.schema"),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "root ::= nowhere"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
])
def test_bad_specs_are_400s_naming_the_field(server, client, body, param):
    response = post(server, "/v1/chat/completions", {"model": "tiny/llama", "messages": ASK, "max_tokens": 5, **body})
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    reply = client.chat.completions.create(model="tiny/llama", messages=ASK, max_tokens=3, temperature=0)  # still serving
    assert reply.choices[0].finish_reason == "length"


def test_bad_schema_in_responses_names_text_format(server):
    response = post(server, "/v1/responses", {"model": "tiny/llama", "input": "x", "text": {"format": {
        "type": "json_schema", "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "text.format.schema"


def test_sdk_sees_a_bad_named_tool_as_a_bad_request(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny/llama", messages=ASK, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "other"}})
