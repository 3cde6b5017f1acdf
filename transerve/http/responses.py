"""POST /v1/responses: the `Response` object (plain JSON here, the event stream in responses_stream.py).
Nothing is stored: every request carries its whole input (see protocol/responses.py)."""

from __future__ import annotations

import time

from quart import Blueprint, jsonify, request

from transerve.http.chat import conversation_requests
from transerve.http.output import Choice, collect, first_event, logprob_entries, stream
from transerve.http.protocol.responses import ResponsesRequest
from transerve.http.response_items import finished, function_item, message_item, new_id, reasoning_item
from transerve.http.responses_stream import ResponseStream
from transerve.http.sse import SSE_HEADERS

bp = Blueprint("responses", __name__)


@bp.post(ResponsesRequest.endpoint)
async def create_response():
    body = ResponsesRequest.parse(await request.get_data())
    engine, s, requests = await conversation_requests(body)  # one choice: Responses refuses n
    events = engine.generate(requests)
    first = await first_event(events)
    base = response_base(body, engine.model_id, s.params.temperature, s.params.top_p)
    logprobs = s.params.num_logprobs is not None
    if body.stream:
        return stream(ResponseStream(base, logprobs), first, events), 200, SSE_HEADERS
    choice = (await collect(events, 1, first))[0]
    return jsonify(finished(base, output_items(choice, logprobs), choice.finish_reason, choice.usage))


def response_base(body: ResponsesRequest, model: str, temperature: float, top_p: float) -> dict:
    """The Response fields that echo the request; status, output and usage are added as it runs."""
    return {
        "id": new_id("resp"),
        "object": "response",
        "created_at": time.time(),
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {},
        "model": model,
        "output": [],
        "parallel_tool_calls": body.parallel_tool_calls,
        "previous_response_id": None,
        "reasoning": {"effort": body.reasoning_effort(), "summary": None},
        "service_tier": "default",
        "store": False,
        "temperature": temperature,
        "text": {"format": _dump(body.text and body.text.format) or {"type": "text"}},
        "tool_choice": _dump(body.tool_choice) or "auto",
        "tools": [tool.model_dump() for tool in body.tools or ()] if body.tool_choice != "none" else [],
        "top_logprobs": body.top_logprobs,
        "top_p": top_p,
        "truncation": "disabled",
        "usage": None,
        "user": body.user,
    }


def _dump(value):
    """A request object as the client sent it (aliases: `schema`, `name`), for echoing."""
    return value.model_dump(by_alias=True, exclude_none=True) if hasattr(value, "model_dump") else value


def output_items(choice: Choice, logprobs: bool) -> list[dict]:
    status = "incomplete" if choice.finish_reason == "length" else "completed"
    items = []
    if choice.reasoning:
        items.append(reasoning_item(new_id("rs"), choice.reasoning, status))
    if choice.text or not choice.tool_calls:
        items.append(message_item(new_id("msg"), choice.text, logprob_entries(choice.logprobs) if logprobs else None, status))
    items += [function_item(new_id("fc"), c.id, c.name, c.arguments, status) for c in choice.tool_calls]
    return items
