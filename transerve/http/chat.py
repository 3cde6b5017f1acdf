"""POST /v1/chat/completions, streaming and not, shaped exactly like OpenAI's."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from quart import Blueprint, current_app, jsonify

from transerve.actors.messages import RequestError, RequestEvent, TextDelta, Usage
from transerve.http.errors import OpenAIError, error_body
from transerve.http.params import json_body, parse_messages, parse_stop, sampling_params
from transerve.http.sse import SSE_HEADERS, sse

bp = Blueprint("chat", __name__)


def usage_dict(usage: Usage | None) -> dict | None:
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


async def first_event(events: AsyncIterator[RequestEvent]) -> RequestEvent:
    """The first event, so that a request rejected by the engine gets a 4xx status, not a stream."""
    event = await anext(events)
    if isinstance(event, RequestError):
        await events.aclose()
        raise OpenAIError(event.message, event.status_code, event.param)
    return event


@bp.post("/v1/chat/completions")
async def chat_completions():
    body = await json_body()
    messages = parse_messages(body)
    engine = await current_app.config["MODELS"].get(body.get("model"))
    params, max_tokens_given = sampling_params(body, engine.generation_defaults, engine.max_model_len)
    stream = bool(body.get("stream", False))
    events = engine.generate(params, max_tokens_given=max_tokens_given, messages=messages, stop=parse_stop(body))
    first = await first_event(events)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.model_id}
    if stream:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage", False))
        return _stream(meta, first, events, include_usage), 200, SSE_HEADERS
    text, last = [first.text], first
    async for event in events:
        if isinstance(event, RequestError):
            raise OpenAIError(event.message, event.status_code, event.param)
        text.append(event.text)
        last = event
    return jsonify({
        **meta,
        "object": "chat.completion",
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": "".join(text), "refusal": None},
            "logprobs": None,
            "finish_reason": last.finish_reason,
        }],
        "usage": usage_dict(last.usage),
    })


async def _stream(meta: dict, first: TextDelta, events: AsyncIterator[RequestEvent], include_usage: bool):
    def chunk(delta: dict, finish_reason: str | None = None) -> bytes:
        body = {**meta, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
        if include_usage:
            body["usage"] = None
        return sse(body)

    async def chunks() -> AsyncIterator[TextDelta | RequestError]:
        yield first
        async for event in events:
            yield event

    yield chunk({"role": "assistant", "content": ""})
    async with _closing(events):
        async for event in chunks():
            if isinstance(event, RequestError):
                yield sse(error_body(event.message, event.status_code, event.param))
                break
            if event.text:
                yield chunk({"content": event.text})
            if event.finish_reason is not None:
                yield chunk({}, event.finish_reason)
                if include_usage:
                    yield sse({**meta, "object": "chat.completion.chunk", "choices": [], "usage": usage_dict(event.usage)})
    yield b"data: [DONE]\n\n"


class _closing:
    """Close the engine's event iterator however the stream ends, which aborts an unfinished request."""

    def __init__(self, events: AsyncIterator) -> None:
        self.events = events

    async def __aenter__(self):
        return self.events

    async def __aexit__(self, *exc) -> None:
        await self.events.aclose()
