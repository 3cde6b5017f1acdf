"""The pure pieces behind the OpenAI surface, without a server: the output parser (thoughts and the three
tool-call formats, fed in random pieces), generation_config mapping, per-step token bans, the
Responses stream's failure path, and the field table against the SDK and the README."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import anyio
import pytest

from openai_server import HERMES_ANSWER
from transerve.actors.messages import RequestError, TextDelta
from transerve.actors.output_parser import OutputParser
from transerve.actors.tool_formats import detect_tool_format
from transerve.engine.request import Request, SamplingParams
from transerve.engine.request import banned_token_ids
from transerve.http.errors import OpenAIError
from transerve.http.fields import markdown_table
from transerve.http.genconfig import parse_generation_config
from transerve.http.protocol import REQUESTS


def parse(text: str, fmt: str | None, reasoning: bool = False, in_reasoning: bool = False, parallel: bool = True,
          seed: int = 0):
    parser = OutputParser(fmt, reasoning, in_reasoning, parallel)
    rng, pieces, i = random.Random(seed), [], 0
    while i < len(text):
        n = rng.randint(1, 6)
        pieces.append(text[i:i + n])
        i += n
    content, thoughts, calls = "", "", []
    for k, piece in enumerate(pieces + [""]):
        out = parser.feed(piece, final=k == len(pieces))
        content, thoughts = content + out.content, thoughts + out.reasoning
        for delta in out.tool_calls:
            if delta.name is not None:
                assert delta.index == len(calls) and delta.id.startswith("call_") and not delta.arguments
                calls.append([delta.name, ""])
            calls[delta.index][1] += delta.arguments
        if parser.done:
            break
    return content, thoughts, [tuple(c) for c in calls]


@pytest.mark.parametrize("seed", range(12))
def test_hermes_thoughts_text_and_parallel_calls_in_any_pieces(seed):
    assert parse(HERMES_ANSWER, "hermes", reasoning=True, seed=seed) == (
        "Let me check.", "I should call tools.", [("get_weather", '{"city": "Paris"}'), ("get_time", '{"zone": "CET"}')])


@pytest.mark.parametrize("text, fmt, expected", [
    ('{"name": "f", "parameters": {"x": 1}}', "llama3_json", ("", "", [("f", '{"x": 1}')])),
    ('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"y": [1, "}"]}}', "llama3_json",
     ("", "", [("a", "{}"), ("b", '{"y": [1, "}"]}')])),
    ('{"a": 1} is JSON, not a call', "llama3_json", ('{"a": 1} is JSON, not a call', "", [])),
    ('[TOOL_CALLS][{"name": "f", "arguments": {"c": "P"}}, {"arguments": {}, "name": "g"}]', "mistral",
     ("", "", [("f", '{"c": "P"}'), ("g", "{}")])),
    ('Sure.[TOOL_CALLS]f[ARGS]{"c": 1}[TOOL_CALLS]g[CALL_ID]a1b2c3d4e[ARGS]{}', "mistral", ("Sure.", "", [("f", '{"c": 1}'), ("g", "{}")])),
    ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>', "hermes", ("", "", [("f", '{"a": 1}')])),
    ("<tool_call>not json</tool_call> ok", "hermes", ("<tool_call>not json</tool_call> ok", "", [])),
    ("a < b <tool", "hermes", ("a < b <tool", "", [])),
    ('<tool_call>{"name": "f", "arguments": {"a": 12', "hermes", ("", "", [("f", '{"a": 12')])),  # cut off: sent as is
])
def test_tool_call_formats(text, fmt, expected):
    for seed in range(4):
        assert parse(text, fmt, seed=seed) == expected


def test_thoughts_when_the_prompt_opened_them_and_without_tools():
    assert parse("hmm\n</think>\n\nAnswer.", None, reasoning=True, in_reasoning=True) == ("Answer.", "hmm", [])
    assert parse("no thoughts here", None, reasoning=True) == ("no thoughts here", "", [])
    content, thoughts, calls = parse(HERMES_ANSWER, None, reasoning=True)
    assert thoughts == "I should call tools." and calls == [] and content.startswith("Let me check.<tool_call>")


def test_parallel_calls_off_stops_after_the_first_call():
    assert parse(HERMES_ANSWER, "hermes", reasoning=True, parallel=False)[2] == [("get_weather", '{"city": "Paris"}')]


def test_tool_format_detection():
    assert detect_tool_format("... <tool_call> ...", {}) == "hermes"
    assert detect_tool_format("[INST] [/INST]", {"[TOOL_CALLS]": 5}) == "mistral"
    assert detect_tool_format("<|start_header_id|>system<|end_header_id|>", {}) == "llama3_json"


def test_generation_config_maps_fields_and_names_unsupported_ones():
    config = json.dumps({"max_new_tokens": 7, "do_sample": False, "repetition_penalty": 1.3, "no_repeat_ngram_size": 2,
                         "num_beams": 1, "transformers_version": "5.0", "stop_strings": "END", "eos_token_id": [5, 6]})
    assert parse_generation_config(config) == {"max_tokens": 7, "do_sample": False, "repetition_penalty": 1.3,
                                               "no_repeat_ngram_size": 2, "stop": ["END"], "stop_token_ids": [5, 6]}
    for bad, param in [({"num_beams": 4}, "generation_config.num_beams"), ({"typical_p": 0.5}, "generation_config.typical_p"),
                       ({"top_k": -1}, "generation_config.top_k"), ("{oops", "generation_config")]:
        with pytest.raises(OpenAIError) as info:
            parse_generation_config(bad)
        assert info.value.param == param


def test_bans_min_tokens_ngrams_and_bad_words():
    def bans(prompt, output, **kw):
        request = Request("r", prompt, SamplingParams(**kw), seed=0, eos_token_ids=frozenset({2}))
        request.output_token_ids = output
        return banned_token_ids(request)

    assert bans([5], [], min_tokens=2, stop_token_ids=(9,)) == (2, 9)
    assert bans([5], [7, 8], min_tokens=2) == ()
    assert bans([1, 2, 3, 1], [4, 1], no_repeat_ngram_size=2) == (2, 4)  # "1 2" and "1 4" were seen
    assert bans([3, 4], [5], no_repeat_ngram_size=1) == (3, 4, 5)
    assert bans([3, 4], [5], bad_words_ids=((5, 6), (4, 7))) == (6,)


def test_responses_stream_ends_with_response_failed_when_the_engine_fails():
    from openai.types.responses import ResponseFailedEvent, ResponseOutputItemDoneEvent, ResponseTextDeltaEvent
    from openai.types.responses.response_stream_event import ResponseStreamEvent
    from pydantic import TypeAdapter

    from transerve.http.output import stream
    from transerve.http.protocol.responses import ResponsesRequest
    from transerve.http.responses import response_base
    from transerve.http.responses_stream import ResponseStream

    async def events():
        yield RequestError("model step failed: boom", 500)

    async def run():
        base = response_base(ResponsesRequest.parse('{"input": "x"}'), "m", 1.0, 1.0)
        return [chunk async for chunk in stream(ResponseStream(base, False), TextDelta("Hel", (5,)), events())]

    # The stream sends each event's SSE frames in one write: the client reads them frame by frame.
    chunks = [frame for frame in b"".join(anyio.run(run)).split(b"\n\n") if frame]
    adapter = TypeAdapter(ResponseStreamEvent)
    parsed = [adapter.validate_python(json.loads(c.decode().split("data: ", 1)[1])) for c in chunks]
    assert [p.sequence_number for p in parsed] == list(range(len(parsed)))
    assert isinstance(parsed[-1], ResponseFailedEvent) and parsed[-1].response.status == "failed"
    assert parsed[-1].response.error.message == "model step failed: boom"
    assert any(isinstance(p, ResponseTextDeltaEvent) and p.delta == "Hel" for p in parsed)
    assert not any(isinstance(p, ResponseOutputItemDoneEvent) for p in parsed)  # the message never finished


def test_every_sdk_field_has_a_status_and_the_readme_lists_them_all():
    from anthropic.types import message_count_tokens_params, message_create_params
    from openai.types import completion_create_params, embedding_create_params
    from openai.types.audio import transcription_create_params, translation_create_params
    from openai.types.chat import completion_create_params as chat_params
    from openai.types.responses import response_create_params

    sdk = {"/v1/chat/completions": chat_params.CompletionCreateParamsBase,
           "/v1/completions": completion_create_params.CompletionCreateParamsBase,
           "/v1/responses": response_create_params.ResponseCreateParamsBase,
           "/v1/audio/transcriptions": transcription_create_params.TranscriptionCreateParamsStreaming,
           "/v1/audio/translations": translation_create_params.TranslationCreateParams,
           "/v1/messages": message_create_params.MessageCreateParamsStreaming,
           "/v1/messages/count_tokens": message_count_tokens_params.MessageCountTokensParams,
           "/v1/embeddings": embedding_create_params.EmbeddingCreateParams}
    for endpoint, params in sdk.items():
        missing = set(params.__annotations__) - set(REQUESTS[endpoint].fields())
        assert not missing, (endpoint, missing)
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert markdown_table() in readme, "README.md's field table is stale: paste `python -m transerve.http.fields`"
    assert re.search(r"\| `generation_config` \| honoured \|", readme)


@pytest.mark.parametrize("body, param, words", [
    ({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": [{"type": "video"}]}]},
     "messages[1].content[0].type", "'video' is not supported"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "is required"),
    ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 101}}, "logit_bias", "less than or equal to 100"),
    ({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": "yes"}},
     "stream_options.include_usage", "valid boolean"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": None, "audio": {}}, "audio", "no audio output"),
])
def test_validation_errors_name_the_nested_field(body, param, words):
    from transerve.http.protocol.chat import ChatCompletionRequest

    with pytest.raises(OpenAIError) as info:
        ChatCompletionRequest.parse(json.dumps(body))
    assert info.value.status_code == 400 and info.value.param == param and words in info.value.message


def test_a_field_added_to_a_model_is_validated_described_and_tabled():
    from pydantic import create_model

    from transerve.http.protocol.base import HONOURED, spec
    from transerve.http.protocol.completions import CompletionRequest

    model = create_model("Extended", __base__=CompletionRequest, top_a=(float | None, spec(HONOURED, "new", ge=0, le=1)))
    assert model.parse('{"prompt": "x", "top_a": 0.5}').top_a == 0.5
    with pytest.raises(OpenAIError) as info:
        model.parse('{"prompt": "x", "top_a": 2}')
    assert info.value.param == "top_a"
    assert model.fields()["top_a"] == (HONOURED, "new")
    assert model.model_json_schema()["properties"]["top_a"]["x-status"] == "honoured"
