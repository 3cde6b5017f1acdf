"""POST /v1/chat/completions, streaming and not, shaped exactly like OpenAI's: n choices, logprobs,
tool calls, and thoughts in `reasoning_content`."""

from __future__ import annotations

import time
import uuid
from typing import Any

from quart import Blueprint, current_app, jsonify, request

from transerve.actors.client import GenerateRequest
from transerve.actors.messages import OutputOptions, TextDelta
from transerve.http.images import load_message_images
from transerve.http.output import Choice, ChoiceChunks, collect, first_event, logprob_entries, stream, total_usage, usage_dict
from transerve.http.protocol.chat import ChatCompletionRequest
from transerve.http.protocol.responses import ResponsesRequest
from transerve.http.protocol.sampling import Sampling
from transerve.http.sse import SSE_HEADERS

bp = Blueprint("chat", __name__)


async def conversation_requests(
    body: ChatCompletionRequest | ResponsesRequest,
) -> tuple[Any, Sampling, list[GenerateRequest]]:
    """A conversation (chat messages, or Responses input read as them): its engine, its sampling, and one
    GenerateRequest per choice, with the answer parsed for tool calls and thoughts."""
    messages = body.template_messages()
    tools = body.template_tools()
    engine = await current_app.config["MODELS"].get(body.model)
    messages, images = await load_message_images(messages, engine)
    s = body.sampling(engine.generation_defaults, engine.vocab_size)
    output = OutputOptions(tools=tools is not None, parallel_tool_calls=body.parallel_tool_calls, reasoning=True)
    kwargs = body.template_kwargs()
    return engine, s, [GenerateRequest(s.choice(i), messages=tuple(messages), stop=s.stop, chat_template_kwargs=kwargs,
                                       tools=tools, output=output, images=images) for i in range(s.n)]


@bp.post(ChatCompletionRequest.endpoint)
async def chat_completions():
    body = ChatCompletionRequest.parse(await request.get_data())
    engine, s, requests = await conversation_requests(body)
    events = engine.generate(requests)
    first = await first_event(events)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": engine.model_id}
    if body.stream:
        return stream(ChatStream(meta, s.n, body.include_usage(), body.logprobs), first, events), 200, SSE_HEADERS
    choices = await collect(events, s.n, first)
    return jsonify({
        **meta,
        "object": "chat.completion",
        "choices": [_choice(i, c, body.logprobs) for i, c in enumerate(choices)],
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


class ChatStream(ChoiceChunks):
    """`chat.completion.chunk`s: each choice's role first, its deltas, its finish; usage last when asked."""

    OBJECT = "chat.completion.chunk"

    def __init__(self, meta: dict, n: int, include_usage: bool, logprobs: bool) -> None:
        super().__init__(meta, n, n, include_usage, logprobs)

    def chunk(self, index: int, delta: dict, finish_reason: str | None = None, event: TextDelta | None = None) -> bytes:
        entries = {"content": logprob_entries(event.logprobs), "refusal": None} if self.logprobs and event is not None else None
        return self.choice_chunk({"index": index, "delta": delta, "logprobs": entries, "finish_reason": finish_reason})

    def start(self) -> list[bytes]:
        return [self.chunk(index, {"role": "assistant", "content": ""}) for index in range(self.n)]

    def delta(self, event: TextDelta) -> list[bytes]:
        out = []
        delta = _delta(event)
        if delta or (self.logprobs and event.logprobs):
            out.append(self.chunk(event.index, delta, event=event))
        if event.finish_reason is not None:
            self.usages[event.index] = event.usage
            out.append(self.chunk(event.index, {}, event.finish_reason))
        return out
