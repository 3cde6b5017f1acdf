"""POST /v1/chat/completions, streaming and not, shaped exactly like OpenAI's: n choices, logprobs,
tool calls, and thoughts in `reasoning_content`."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from quart import Blueprint, current_app, jsonify

from transerve.actors.client import GenerateRequest
from transerve.actors.messages import OutputOptions, RequestError, RequestEvent, TextDelta, Usage
from transerve.http.errors import OpenAIError, error_body
from transerve.http.fields import check_fields
from transerve.http.images import load_message_images
from transerve.http.output import (
    Choice, collect, first_event, logprob_entries, total_usage, usage_dict,
)
from transerve.http.params import MAX_LOGPROBS, boolean, choice_params, json_body, number, parse_messages, sampling
from transerve.http.sse import SSE_HEADERS, sse
from transerve.http.tools import chat_tools, template_messages

bp = Blueprint("chat", __name__)
ENDPOINT = "/v1/chat/completions"


# apply_chat_template's own arguments: a request may not swap the template or change how it is applied.
_RESERVED_TEMPLATE_KWARGS = {"chat_template", "tools", "documents", "add_generation_prompt", "continue_final_message",
                             "tokenize", "return_dict", "return_tensors", "padding", "truncation", "max_length",
                             "tokenizer_kwargs", "return_assistant_tokens_mask", "conversation"}


def chat_template_kwargs(body: dict, reasoning_effort: str | None = None) -> tuple:
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise OpenAIError("'chat_template_kwargs' must be an object", 400, "chat_template_kwargs")
    for name in kwargs:
        if name in _RESERVED_TEMPLATE_KWARGS:
            raise OpenAIError(f"chat_template_kwargs.{name} is not allowed: it is how the server applies the template",
                              400, f"chat_template_kwargs.{name}")
    effort = reasoning_effort or body.get("reasoning_effort")
    if effort is not None:
        kwargs = {"reasoning_effort": effort, **kwargs}
    return tuple(kwargs.items())


def _check_values(body: dict) -> int | None:
    """Values the field table calls partly supported; returns the number of top logprobs wanted."""
    response_format = body.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise OpenAIError("response_format: only {'type': 'text'} is supported (JSON modes need constrained decoding)",
                          400, "response_format")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise OpenAIError("modalities: only ['text'] is supported", 400, "modalities")
    top = number(body, "top_logprobs", 0, MAX_LOGPROBS, None, integer=True)
    if not boolean(body, "logprobs"):
        if top is not None:
            raise OpenAIError("top_logprobs needs logprobs: true", 400, "top_logprobs")
        return None
    return top or 0


def stream_options(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise OpenAIError("'stream_options' must be an object", 400, "stream_options")
    return boolean(options, "include_usage")


@bp.post(ENDPOINT)
async def chat_completions():
    body = await json_body()
    check_fields(body, ENDPOINT)
    messages = template_messages(parse_messages(body.get("messages")))
    num_logprobs = _check_values(body)
    tools = chat_tools(body)
    include_usage = stream_options(body)
    engine = await current_app.config["MODELS"].get(body.get("model"))
    messages, images = await load_message_images(messages, engine)
    s = sampling(body, engine, max_tokens_fields=("max_completion_tokens", "max_tokens"), num_logprobs=num_logprobs)
    output = OutputOptions(tools=tools is not None, parallel_tool_calls=boolean(body, "parallel_tool_calls", True), reasoning=True)
    kwargs = chat_template_kwargs(body)
    requests = [GenerateRequest(choice_params(s, i), messages=tuple(messages), stop=s.stop,
                                chat_template_kwargs=kwargs, tools=tools, output=output, images=images) for i in range(s.n)]
    events = engine.generate(requests)
    first = await first_event(events)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.model_id}
    if boolean(body, "stream"):
        return _stream(meta, first, events, s.n, include_usage, num_logprobs is not None), 200, SSE_HEADERS
    choices = await collect(events, s.n, first)
    return jsonify({
        **meta,
        "object": "chat.completion",
        "choices": [_choice(i, c, num_logprobs is not None) for i, c in enumerate(choices)],
        "usage": usage_dict(total_usage([c.usage for c in choices], s.n)),
        "service_tier": "default",
        "system_fingerprint": None,
    })


def _choice(index: int, choice: Choice, logprobs: bool) -> dict:
    message = {"role": "assistant", "content": choice.text if choice.text or not choice.tool_calls else None, "refusal": None}
    if choice.reasoning:
        message["reasoning_content"] = choice.reasoning
    if choice.tool_calls:
        message["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in choice.tool_calls]
    return {
        "index": index,
        "message": message,
        "logprobs": {"content": logprob_entries(choice.logprobs), "refusal": None} if logprobs else None,
        "finish_reason": choice.finish_reason,
    }


def _delta(event: TextDelta) -> dict:
    delta: dict = {}
    if event.reasoning:
        delta["reasoning_content"] = event.reasoning
    if event.text:
        delta["content"] = event.text
    if event.tool_calls:
        delta["tool_calls"] = [
            {"index": d.index, "id": d.id, "type": "function", "function": {"name": d.name, "arguments": d.arguments}}
            if d.name is not None else {"index": d.index, "function": {"arguments": d.arguments}}
            for d in event.tool_calls
        ]
    return delta


async def _stream(meta: dict, first: RequestEvent, events: AsyncIterator[RequestEvent], n: int, include_usage: bool,
                  logprobs: bool):
    def chunk(index: int, delta: dict, finish_reason: str | None = None, event: TextDelta | None = None) -> bytes:
        entries = {"content": logprob_entries(event.logprobs), "refusal": None} if logprobs and event is not None else None
        body = {**meta, "object": "chat.completion.chunk",
                "choices": [{"index": index, "delta": delta, "logprobs": entries, "finish_reason": finish_reason}]}
        if include_usage:
            body["usage"] = None
        return sse(body)

    usages: list[Usage | None] = [None] * n
    for index in range(n):
        yield chunk(index, {"role": "assistant", "content": ""})
    async with aclosing(events):
        event = first
        while event is not None:
            if isinstance(event, RequestError):
                yield sse(error_body(event.message, event.status_code, event.param))
                break
            delta = _delta(event)
            if delta or (logprobs and event.logprobs):
                yield chunk(event.index, delta, event=event)
            if event.finish_reason is not None:
                usages[event.index] = event.usage
                yield chunk(event.index, {}, event.finish_reason)
            event = await anext(events, None)
        else:
            if include_usage:
                yield sse({**meta, "object": "chat.completion.chunk", "choices": [], "usage": usage_dict(total_usage(usages, n))})
    yield b"data: [DONE]\n\n"
