"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API over the chat engine path.

The body (protocol/messages.py) becomes a chat request, so the prompt is built by the same code as chat's
and Responses' (`chat.conversation_requests`); the answer is shaped as a Message here, or as Anthropic's
event stream (messages_stream.py). Every error on these paths, whoever raised it, leaves in Anthropic's
shape `{"type": "error", "error": {"type", "message"}}` with the same status.
"""

from __future__ import annotations

import json
import uuid

from quart import Blueprint, Response, jsonify, request

from transerve.http.chat import conversation_requests
from transerve.http.errors import OpenAIError
from transerve.http.message_blocks import anthropic_error, content_blocks, stop_fields, usage_dict
from transerve.http.messages_stream import MessageStream
from transerve.http.output import collect, first_event, stream
from transerve.http.protocol.messages import CountTokensRequest, MessagesRequest
from transerve.http.sse import SSE_HEADERS
from transerve.media.errors import PromptError

bp = Blueprint("messages", __name__)


@bp.post(MessagesRequest.endpoint)
async def create_message():
    body = MessagesRequest.parse(await request.get_data())
    engine, _, requests = await conversation_requests(body.chat_request())
    events = engine.generate(requests)
    first = await first_event(events)
    message = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "model": engine.model_id}
    if body.stream:
        return stream(MessageStream(message), first, events), 200, SSE_HEADERS
    choice = (await collect(events, 1, first))[0]
    return jsonify({**message, "content": content_blocks(choice), **stop_fields(choice.finish_reason, choice.stop_sequence),
                    "usage": usage_dict(choice.usage)})


@bp.post(CountTokensRequest.endpoint)
async def count_tokens():
    body = CountTokensRequest.parse(await request.get_data())
    engine, _, requests = await conversation_requests(body.chat_request())
    try:
        return jsonify({"input_tokens": await engine.count_prompt_tokens(requests[0])})
    except PromptError as exc:
        raise OpenAIError(str(exc), 400, exc.param) from exc


@bp.after_request
async def _anthropic_errors(response: Response) -> Response:
    """The app's error handlers write OpenAI's shape (one place decides every status); here it becomes Anthropic's."""
    if response.status_code < 400 or response.mimetype != "application/json":
        return response
    body = json.loads(await response.get_data(as_text=True))
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and "message" in error:
        response.set_data(json.dumps(anthropic_error(error["message"], response.status_code)))
    return response
