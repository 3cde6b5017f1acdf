"""A lagging handler gets merged deltas, and every stream reads the same as with one delta per token: chat,
legacy completions, Responses and Anthropic Messages, with thoughts, tool calls, logprobs, stop strings,
finish reasons and usage. Also the DeltaStream's own contract (end, errors, a closed handler, cancellation)."""

from __future__ import annotations

import json
import random

import anyio
import pytest

from openai_server import HERMES_ANSWER
from transerve.actors import detokenizer
from transerve.actors.delta_stream import DeltaStream
from transerve.actors.messages import NewToken, OpenStream, ParserSpec, RequestError, TextDelta
from transerve.engine.step import SampledLogprobs
from transerve.http.chat import ChatStream
from transerve.http.completions import CompletionStream
from transerve.http.messages_stream import MessageStream
from transerve.http.output import stream
from transerve.http.responses_stream import ResponseStream

META = {"id": "chatcmpl-1", "created": 0, "model": "m"}


def engine_deltas(tokenizer, text: str, parser: ParserSpec | None, stop: tuple[str, ...] = (), max_tokens: int = 0,
                  logprobs: bool = True) -> list[TextDelta]:
    """The detokenizer's deltas for `text`'s tokens (with logprobs), each taken as soon as it is sent."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_tokens:
        ids = ids[:max_tokens]
    events = DeltaStream(len(ids) + 2)
    state = detokenizer.open_stream(detokenizer.TokenTexts(tokenizer), OpenStream("r", stop, events.sender(), 0, parser))
    texts = detokenizer.TokenTexts(tokenizer)
    out = []

    async def run():
        for k, token_id in enumerate(ids):
            last = k == len(ids) - 1
            sampled = SampledLogprobs(-0.1 * k, (token_id, 0), (-0.1 * k, -5.0)) if logprobs else None
            token = NewToken("r", token_id, ("length" if max_tokens else "stop") if last else None, 7, 3, sampled)
            finished = await detokenizer._on_token(state, token, texts)
            while len(events):
                out.append(events.receive_nowait())
            if finished:
                return
    anyio.run(run)
    return out


def lagging(deltas: list[TextDelta], seed: int | None) -> list[TextDelta]:
    """What a handler that wakes at random moments (never, with seed None) receives of `deltas`."""
    rng = random.Random(seed)
    events = DeltaStream(len(deltas) + 1)
    sender = events.sender()
    out = []
    for delta in deltas:
        sender.send_nowait(delta)
        if seed is not None and rng.random() < 0.3:
            out.append(events.receive_nowait())
    sender.close()
    while len(events):
        out.append(events.receive_nowait())
    with pytest.raises(anyio.EndOfStream):
        events.receive_nowait()
    return out


def render(shape, deltas: list[TextDelta]) -> list[dict]:
    """The SSE events the client reads, data parsed."""
    async def events():
        for delta in deltas[1:]:
            yield delta

    async def body():
        return b"".join([chunk async for chunk in stream(shape, deltas[0], events())])

    frames = anyio.run(body).decode().split("\n\n")
    return [json.loads(line[6:]) for frame in frames for line in frame.split("\n")
            if line.startswith("data: ") and line != "data: [DONE]"]


def chat_answer(chunks: list[dict]) -> dict:
    """What the openai SDK's stream accumulation makes of chat chunks."""
    answer = {"content": "", "reasoning": "", "calls": {}, "logprobs": [], "finish": None, "usage": None}
    for chunk in chunks:
        answer["usage"] = chunk.get("usage") or answer["usage"]
        for choice in chunk["choices"]:
            delta = choice["delta"]
            answer["content"] += delta.get("content") or ""
            answer["reasoning"] += delta.get("reasoning_content") or ""
            for call in delta.get("tool_calls") or []:
                entry = answer["calls"].setdefault(call["index"], {"id": call.get("id"), "name": None, "arguments": ""})
                entry["name"] = call["function"].get("name") or entry["name"]
                entry["arguments"] += call["function"]["arguments"]
            answer["logprobs"] += (choice["logprobs"] or {}).get("content") or []
            answer["finish"] = choice["finish_reason"] or answer["finish"]
    return answer


def without_ids(value):
    """Responses' item ids and timestamps are new on every stream."""
    if isinstance(value, dict):
        return {k: without_ids(v) for k, v in value.items() if k not in ("id", "completed_at", "created_at")}
    if isinstance(value, list):
        return [without_ids(v) for v in value]
    return value


def text_deltas(events: list[dict], kind: str, field: str) -> str:
    return "".join(e[field] for e in events if e["type"] == kind)


CASES = {
    "plain": ("Hello there! Ünïcödé, emoji 🎉🎉 and a longer answer that goes on for a while.", None, ()),
    "stop string": ("The answer is forty-two, said the computer, and more.", None, ("y-tw",)),
    "thoughts and tool calls": (HERMES_ANSWER, ParserSpec("hermes", True, False), ()),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", [None, 0, 1])
def test_merged_deltas_read_as_the_unmerged_stream_on_every_endpoint(tokenizer, case, seed):
    text, parser, stop = CASES[case]
    unmerged = engine_deltas(tokenizer, text, parser, stop)
    merged = lagging(unmerged, seed)
    assert len(merged) < len(unmerged)
    if seed is None and parser is None:  # a handler that never woke gets one delta
        assert len(merged) == 1

    chat = [chat_answer(render(ChatStream(META, 1, True, True), d)) for d in (unmerged, merged)]
    assert chat[0] == chat[1]
    assert len(chat[1]["logprobs"]) == sum(len(d.token_ids) for d in unmerged)
    assert chat[1]["usage"]["completion_tokens"] == sum(len(d.token_ids) for d in unmerged)
    if case == "thoughts and tool calls":
        assert chat[1]["finish"] == "tool_calls" and [c["name"] for c in chat[1]["calls"].values()] == ["get_weather", "get_time"]
        assert json.loads(chat[1]["calls"][0]["arguments"]) == {"city": "Paris"}
    elif case == "stop string":
        assert chat[1]["content"] == "The answer is fort" and chat[1]["finish"] == "stop"

    completions = [render(CompletionStream(META, [""], 1, True, True), d) for d in (unmerged, merged)]
    for field in ("text",):
        assert "".join(c["choices"][0][field] for c in completions[0] if c["choices"]) == \
               "".join(c["choices"][0][field] for c in completions[1] if c["choices"])
    offsets = [[o for c in chunks if c["choices"] for o in c["choices"][0]["logprobs"]["text_offset"]] for chunks in completions]
    assert offsets[0] == offsets[1] and len(offsets[1]) == len(chat[1]["logprobs"])
    assert completions[0][-1]["usage"] == completions[1][-1]["usage"]

    responses = [render(ResponseStream({"id": "resp_1", "status": "in_progress"}, True), d) for d in (unmerged, merged)]
    assert without_ids(responses[0][-1]) == {**without_ids(responses[1][-1]), "sequence_number": responses[0][-1]["sequence_number"]}
    assert [e["type"] for e in responses[1] if e["type"].startswith("response.output_item")] == \
           [e["type"] for e in responses[0] if e["type"].startswith("response.output_item")]
    assert text_deltas(responses[0], "response.output_text.delta", "delta") == \
           text_deltas(responses[1], "response.output_text.delta", "delta")

    messages = [render(MessageStream({"id": "msg_1", "type": "message", "role": "assistant", "model": "m"}), d)
                for d in (unmerged, merged)]
    blocks = [[(e["index"], e["content_block"]["type"]) for e in m if e["type"] == "content_block_start"] for m in messages]
    assert blocks[0] == blocks[1]
    pieces = [{} for _ in messages]
    for m, joined in zip(messages, pieces):
        for e in m:
            if e["type"] == "content_block_delta":
                delta = e["delta"]
                joined[e["index"]] = joined.get(e["index"], "") + delta.get("text", delta.get("thinking", delta.get("partial_json", "")))
    assert pieces[0] == pieces[1]
    assert [e for e in messages[0] if e["type"] == "message_delta"] == [e for e in messages[1] if e["type"] == "message_delta"]


def test_without_logprobs_thoughts_text_and_tool_calls_merge_into_one_delta_each(tokenizer):
    text, parser, _ = CASES["thoughts and tool calls"]
    unmerged = engine_deltas(tokenizer, text, parser, logprobs=False)
    merged = lagging(unmerged, None)
    assert [(bool(d.reasoning), bool(d.text), len(d.tool_calls)) for d in merged] == [(True, False, 0), (False, True, 0), (False, False, 2)]
    assert chat_answer(render(ChatStream(META, 1, True, False), merged)) == chat_answer(render(ChatStream(META, 1, True, False), unmerged))


def test_a_finish_by_length_merges_into_the_last_text(tokenizer):
    unmerged = engine_deltas(tokenizer, "one two three four five six seven", None, max_tokens=5)
    [merged] = lagging(unmerged, None)
    assert merged.finish_reason == "length" and merged.usage == unmerged[-1].usage
    assert merged.text == "".join(d.text for d in unmerged)
    assert merged.token_ids == tuple(t for d in unmerged for t in d.token_ids)


def test_choices_merge_apart_and_an_error_is_not_merged_over():
    events = DeltaStream(16)
    first, second = events.sender(), events.sender()
    for k in range(3):
        first.send_nowait(TextDelta(f"a{k}", (k,), index=0))
        second.send_nowait(TextDelta(f"b{k}", (k,), index=1))
    second.send_nowait(RequestError("boom", 500, index=1))
    first.send_nowait(TextDelta("late", (9,), index=0))
    taken = [events.receive_nowait() for _ in range(len(events))]
    assert [(e.index, getattr(e, "text", e.message if isinstance(e, RequestError) else None)) for e in taken] == [
        (0, "a0a1a2"), (1, "b0b1b2"), (1, "boom"), (0, "late")]


def test_the_stream_ends_when_every_sender_is_closed_and_drops_events_once_the_handler_left():
    async def run():
        events = DeltaStream(4)
        first, second = events.sender(), events.sender()
        received = []

        async def handler():
            try:
                while True:
                    received.append(await events.receive())
            except anyio.EndOfStream:
                pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(handler)
            await anyio.sleep(0.01)
            first.send_nowait(TextDelta("x", (1,), "stop"))
            first.close()
            await anyio.sleep(0.01)
            assert [e.text for e in received] == ["x"]  # one sender is still open: the handler waits
            await second.aclose()
        events.close()
        with pytest.raises(anyio.BrokenResourceError):
            events.put(TextDelta("y", (2,)))
        with pytest.raises(anyio.ClosedResourceError):
            first.send_nowait(TextDelta("z", (3,)))

    anyio.run(run)


def test_a_cancelled_handler_wait_raises_cancelled_and_leaves_the_stream_usable():
    async def run():
        events = DeltaStream(4)
        sender = events.sender()
        with anyio.move_on_after(0.01) as scope:
            await events.receive()
        assert scope.cancelled_caught
        sender.send_nowait(TextDelta("x", (1,)))
        assert (await events.receive()).text == "x"

    anyio.run(run)


def test_a_full_stream_refuses_rather_than_grows():
    events = DeltaStream(2)
    sender = events.sender()
    sender.send_nowait(RequestError("a"))
    sender.send_nowait(RequestError("b"))
    with pytest.raises(anyio.WouldBlock):
        sender.send_nowait(TextDelta("x", (1,)))
