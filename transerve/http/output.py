"""What the endpoints share about answers: the one loop every stream runs, collecting a choice's events,
usage, logprobs."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from transerve.actors.messages import RequestError, RequestEvent, TextDelta, TokenLogprob, ToolCallDelta, Usage
from transerve.http.errors import OpenAIError, error_body
from transerve.http.sse import DONE, compact_json, sse


async def first_event(events: AsyncIterator[RequestEvent]) -> RequestEvent:
    """The first event, so that a request rejected by the engine gets a 4xx status, not a stream."""
    event = await anext(events)
    if isinstance(event, RequestError):
        await events.aclose()
        raise OpenAIError(event.message, event.status_code, event.param)
    return event


class StreamShape(Protocol):
    """How one endpoint shapes its stream; `stream` runs the loop around it."""

    def start(self) -> Iterable[bytes]: ...  # before the first event
    def delta(self, event: TextDelta) -> Iterable[bytes]: ...
    def failed(self, error: RequestError) -> Iterable[bytes]: ...  # the stream ends after these
    def ended(self) -> Iterable[bytes]: ...  # after the engine's last event


async def stream(shape: StreamShape, first: RequestEvent, events: AsyncIterator[RequestEvent]) -> AsyncIterator[bytes]:
    """Every stream's loop: `first` (already taken, see first_event), then the rest; a failure ends the
    stream with the endpoint's own error chunks, never with a cut connection. Each event's chunks go out
    as one body, so one socket write (hypercorn's cost per body dominates a small chunk's)."""
    body = b"".join(shape.start())
    if body:
        yield body
    async with aclosing(events):
        event = first
        while event is not None:
            if isinstance(event, RequestError):
                yield b"".join(shape.failed(event))
                return
            body = b"".join(shape.delta(event))
            if body:
                yield body
            event = await anext(events, None)
    body = b"".join(shape.ended())
    if body:
        yield body


class ChoiceChunks:
    """What the chat and legacy completion streams share: one chunk object per choice's event, a usage
    slot per choice, the error event, and the usage chunk (when asked) and [DONE] at the end."""

    OBJECT: ClassVar[str]

    def __init__(self, meta: dict, num_choices: int, n: int, include_usage: bool, logprobs: bool) -> None:
        self.meta, self.n, self.include_usage, self.logprobs = meta, n, include_usage, logprobs
        self.usages: list[Usage | None] = [None] * num_choices
        # Every chunk is `{**meta, "object", "choices": [choice], "usage": null when asked}`: only the choice
        # changes, so the frame around it is encoded once.
        head = compact_json({**meta, "object": self.OBJECT})
        self.chunk_head = f"data: {head[:-1]},\"choices\":[".encode()
        self.chunk_tail = b'],"usage":null}\n\n' if include_usage else b"]}\n\n"

    def choice_chunk(self, choice: dict) -> bytes:
        return self.chunk_head + compact_json(choice).encode() + self.chunk_tail

    def failed(self, error: RequestError) -> list[bytes]:
        return [sse(error_body(error.message, error.status_code, error.param)), DONE]

    def ended(self) -> list[bytes]:
        if not self.include_usage:
            return [DONE]
        usage = usage_dict(total_usage(self.usages, self.n))
        return [sse({**self.meta, "object": self.OBJECT, "choices": [], "usage": usage}), DONE]

@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""


@dataclass
class Choice:
    """One choice's whole answer, put together from its events."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_sequence: str | None = None
    usage: Usage | None = None

    def add(self, event: TextDelta) -> None:
        self.text += event.text
        self.reasoning += event.reasoning
        for delta in event.tool_calls:
            add_tool_delta(self.tool_calls, delta)
        self.logprobs.extend(event.logprobs)
        self.token_ids.extend(event.token_ids)
        if event.finish_reason is not None:
            self.finish_reason, self.usage, self.stop_sequence = event.finish_reason, event.usage, event.stop_sequence


def add_tool_delta(calls: list[ToolCall], delta: ToolCallDelta) -> None:
    if delta.name is not None:
        calls.append(ToolCall(delta.id or "", delta.name))
    calls[delta.index].arguments += delta.arguments


async def collect(events: AsyncIterator[RequestEvent], count: int, first: RequestEvent | None = None) -> list[Choice]:
    """Every choice's answer (`first` already taken from `events`); a failure of any choice fails the request."""
    choices = [Choice() for _ in range(count)]
    async with aclosing(events):
        event = first if first is not None else await anext(events, None)
        while event is not None:
            if isinstance(event, RequestError):
                raise OpenAIError(event.message, event.status_code, event.param)
            choices[event.index].add(event)
            event = await anext(events, None)
    return choices


def total_usage(usages: list[Usage | None], per_prompt: int = 1) -> Usage:
    """Usage of a whole request: each prompt counted once (n choices share one), every answer counted."""
    usages = [u or Usage(0, 0) for u in usages]
    prompts = usages[::per_prompt]
    return Usage(sum(u.prompt_tokens for u in prompts), sum(u.completion_tokens for u in usages),
                 sum(u.cached_tokens for u in prompts), sum(u.reasoning_tokens for u in usages))


def usage_dict(usage: Usage | None) -> dict | None:
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def finite(logprob: float) -> float:
    """JSON has no -Infinity: a banned token's logprob is reported as OpenAI's floor."""
    return logprob if math.isfinite(logprob) else -9999.0


def logprob_entries(logprobs: list[TokenLogprob] | tuple[TokenLogprob, ...]) -> list[dict]:
    """Chat's and Responses' shape: token, logprob, bytes, top_logprobs."""
    return [{
        "token": lp.token,
        "logprob": finite(lp.logprob),
        "bytes": list(lp.token.encode("utf-8")),
        "top_logprobs": [{"token": t, "logprob": finite(v), "bytes": list(t.encode("utf-8"))} for t, v in lp.top],
    } for lp in logprobs]
