"""POST /v1/completions (the legacy API): prompts as text or token ids, one or many, n choices each,
echo and logprobs. The text comes back raw: no chat template, no tool or thought parsing."""

from __future__ import annotations

import time
import uuid

from quart import Blueprint, current_app, jsonify, request

from transerve.actors.client import GenerateRequest
from transerve.actors.messages import TextDelta, TokenLogprob
from transerve.http.errors import OpenAIError
from transerve.http.output import ChoiceChunks, collect, finite, first_event, stream, total_usage, usage_dict
from transerve.http.protocol.completions import CompletionRequest
from transerve.http.protocol.sampling import MAX_CHOICES
from transerve.http.sse import SSE_HEADERS

bp = Blueprint("completions", __name__)


@bp.post(CompletionRequest.endpoint)
async def completions():
    body = CompletionRequest.parse(await request.get_data())
    engine = await current_app.config["MODELS"].get(body.model)
    s = body.sampling(engine.generation_defaults, engine.vocab_size)
    prompts = body.prompts(engine.vocab_size)
    if len(prompts) * s.n > MAX_CHOICES:
        raise OpenAIError(f"at most {MAX_CHOICES} choices (prompts times n) per request", 400, "n")
    requests = [
        GenerateRequest(s.choice(j), prompt=p if isinstance(p, str) else None,
                        prompt_token_ids=p if isinstance(p, tuple) else None, stop=s.stop)
        for p in prompts for j in range(s.n)
    ]
    echoes = [(p if isinstance(p, str) else engine.tokenizer.decode(list(p))) if body.echo else ""
              for p in prompts for _ in range(s.n)]
    events = engine.generate(requests)
    first = await first_event(events)
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.model_id}
    logprobs = body.logprobs is not None
    if body.stream:
        return stream(CompletionStream(meta, echoes, s.n, body.include_usage(), logprobs), first, events), 200, SSE_HEADERS
    choices = await collect(events, len(requests), first)
    return jsonify({
        **meta,
        "object": "text_completion",
        "choices": [{
            "index": i,
            "text": echoes[i] + c.text,
            "logprobs": completion_logprobs(c.logprobs, len(echoes[i]))[0] if logprobs else None,
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


class CompletionStream(ChoiceChunks):
    """`text_completion` chunks: each echo first, then every delta with its finish; usage last when asked."""

    OBJECT = "text_completion"

    def __init__(self, meta: dict, echoes: list[str], n: int, include_usage: bool, logprobs: bool) -> None:
        super().__init__(meta, len(echoes), n, include_usage, logprobs)
        self.echoes = echoes
        self.offsets = [len(e) for e in echoes]

    def chunk(self, index: int, text: str, entries: dict | None, finish_reason: str | None) -> bytes:
        return self.choice_chunk({"index": index, "text": text, "logprobs": entries, "finish_reason": finish_reason})

    def start(self) -> list[bytes]:
        return [self.chunk(index, text, None, None) for index, text in enumerate(self.echoes) if text]

    def delta(self, event: TextDelta) -> list[bytes]:
        entries = None
        if self.logprobs:
            entries, self.offsets[event.index] = completion_logprobs(event.logprobs, self.offsets[event.index])
        if event.finish_reason is not None:
            self.usages[event.index] = event.usage
        return [self.chunk(event.index, event.text, entries, event.finish_reason)]
