"""POST /v1/completions (the legacy API): prompts as text or token ids, one or many, n choices each,
echo and logprobs. The text comes back raw: no chat template, no tool or thought parsing."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

from quart import Blueprint, current_app, jsonify

from transerve.actors.client import GenerateRequest
from transerve.actors.messages import RequestError, RequestEvent, TokenLogprob, Usage
from transerve.http.chat import stream_options
from transerve.http.errors import OpenAIError, error_body
from transerve.http.fields import check_fields
from transerve.http.output import collect, finite, first_event, total_usage, usage_dict
from transerve.http.params import MAX_LOGPROBS, boolean, choice_params, json_body, number, sampling
from transerve.http.sse import SSE_HEADERS, sse

bp = Blueprint("completions", __name__)
ENDPOINT = "/v1/completions"
MAX_CHOICES = 128


def _is_ids(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def parse_prompts(body: dict) -> list[str | tuple[int, ...]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if _is_ids(prompt):
        return [tuple(prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(_is_ids(p) for p in prompt):
            return [tuple(p) for p in prompt]
    raise OpenAIError("'prompt' must be a string, a list of strings, a list of token ids or a list of such lists",
                      400, "prompt")


@bp.post(ENDPOINT)
async def completions():
    body = await json_body()
    check_fields(body, ENDPOINT)
    prompts = parse_prompts(body)
    num_logprobs = number(body, "logprobs", 0, MAX_LOGPROBS, None, integer=True)
    echo = boolean(body, "echo")
    if echo and num_logprobs is not None:
        raise OpenAIError("echo with logprobs would need the prompt's logprobs, which this server does not compute", 400, "echo")
    include_usage = stream_options(body)
    engine = await current_app.config["MODELS"].get(body.get("model"))
    s = sampling(body, engine, max_tokens_fields=("max_tokens",), default_max_tokens=16, num_logprobs=num_logprobs)
    best_of = number(body, "best_of", 1, MAX_CHOICES, None, integer=True)
    if best_of is not None and best_of != s.n:
        raise OpenAIError("best_of must equal n: choosing among hidden choices is not supported", 400, "best_of")
    if len(prompts) * s.n > MAX_CHOICES:
        raise OpenAIError(f"at most {MAX_CHOICES} choices (prompts times n) per request", 400, "n")
    for prompt in prompts:
        if isinstance(prompt, tuple) and not all(0 <= t < engine.vocab_size for t in prompt):
            raise OpenAIError(f"prompt: token ids must be between 0 and {engine.vocab_size - 1}", 400, "prompt")
    requests = [
        GenerateRequest(choice_params(s, j), prompt=p if isinstance(p, str) else None,
                        prompt_token_ids=p if isinstance(p, tuple) else None, stop=s.stop)
        for p in prompts for j in range(s.n)
    ]
    echoes = [(p if isinstance(p, str) else engine.tokenizer.decode(list(p))) if echo else "" for p in prompts for _ in range(s.n)]
    events = engine.generate(requests)
    first = await first_event(events)
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.model_id}
    if boolean(body, "stream"):
        return _stream(meta, first, events, echoes, s.n, include_usage, num_logprobs is not None), 200, SSE_HEADERS
    choices = await collect(events, len(requests), first)
    return jsonify({
        **meta,
        "object": "text_completion",
        "choices": [{
            "index": i,
            "text": echoes[i] + c.text,
            "logprobs": completion_logprobs(c.logprobs, len(echoes[i]))[0] if num_logprobs is not None else None,
            "finish_reason": c.finish_reason,
        } for i, c in enumerate(choices)],
        "usage": usage_dict(total_usage([c.usage for c in choices], s.n)),
        "system_fingerprint": None,
    })


def completion_logprobs(logprobs: list[TokenLogprob] | tuple[TokenLogprob, ...], offset: int) -> tuple[dict, int]:
    """The legacy shape: parallel lists, top logprobs as {token: logprob}; and the offset after them."""
    text_offset = []
    for lp in logprobs:
        text_offset.append(offset)
        offset += len(lp.token)
    return {
        "tokens": [lp.token for lp in logprobs],
        "token_logprobs": [finite(lp.logprob) for lp in logprobs],
        "top_logprobs": [{t: finite(v) for t, v in lp.top} for lp in logprobs],
        "text_offset": text_offset,
    }, offset


async def _stream(meta: dict, first: RequestEvent, events: AsyncIterator[RequestEvent], echoes: list[str], n: int,
                  include_usage: bool, logprobs: bool):
    def chunk(index: int, text: str, entries: dict | None, finish_reason: str | None) -> bytes:
        body = {**meta, "object": "text_completion",
                "choices": [{"index": index, "text": text, "logprobs": entries, "finish_reason": finish_reason}]}
        if include_usage:
            body["usage"] = None
        return sse(body)

    usages: list[Usage | None] = [None] * len(echoes)
    offsets = [len(e) for e in echoes]
    for index, text in enumerate(echoes):
        if text:
            yield chunk(index, text, None, None)
    async with aclosing(events):
        event = first
        while event is not None:
            if isinstance(event, RequestError):
                yield sse(error_body(event.message, event.status_code, event.param))
                break
            entries = None
            if logprobs:
                entries, offsets[event.index] = completion_logprobs(event.logprobs, offsets[event.index])
            yield chunk(event.index, event.text, entries, event.finish_reason)
            if event.finish_reason is not None:
                usages[event.index] = event.usage
            event = await anext(events, None)
        else:
            if include_usage:
                yield sse({**meta, "object": "text_completion", "choices": [], "usage": usage_dict(total_usage(usages, n))})
    yield b"data: [DONE]\n\n"
