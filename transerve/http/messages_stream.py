"""The Messages event stream, as Anthropic sends it: `message_start`, then each content block as
`content_block_start`, its deltas (`thinking_delta`, `text_delta`, `input_json_delta`) and
`content_block_stop`, then `message_delta` (stop_reason, usage) and `message_stop`.

Thoughts, text and tool calls arrive interleaved as the model writes them; each change of kind closes
the open block and opens the next, so the client sees the same blocks, in the same order, as the plain
Message. A failure after the stream has started ends it with an `error` event, never a cut connection.
"""

from __future__ import annotations

from transerve.actors.messages import RequestError, TextDelta
from transerve.http.message_blocks import anthropic_error, stop_fields, usage_dict
from transerve.http.sse import sse

_EMPTY = {"text": {"type": "text", "text": ""}, "thinking": {"type": "thinking", "thinking": "", "signature": ""}}


def event(kind: str, **fields) -> bytes:
    return sse({"type": kind, **fields}, event=kind)


class MessageStream:
    """The events of one Message (see output.stream for the loop around it)."""

    def __init__(self, message: dict) -> None:
        self.message = message  # id, type, role, model
        self.index = -1  # of the open (or last) content block
        self.kind: str | None = None  # of the open block
        self.done = False

    def start(self) -> list[bytes]:
        # The prompt's length is known only at the end: message_delta's usage carries it (the SDK takes it from there).
        return [event("message_start", message={**self.message, "content": [], "stop_reason": None, "stop_sequence": None,
                                                "usage": {"input_tokens": 0, "output_tokens": 0}})]

    def delta(self, delta: TextDelta) -> list[bytes]:
        out: list[bytes] = []
        if delta.reasoning:
            out += self.open("thinking")
            out.append(self.block_delta({"type": "thinking_delta", "thinking": delta.reasoning}))
        if delta.text:
            out += self.open("text")
            out.append(self.block_delta({"type": "text_delta", "text": delta.text}))
        for call in delta.tool_calls:
            if call.name is not None:
                out += self.open("tool_use", {"type": "tool_use", "id": call.id or "", "name": call.name, "input": {}})
            if call.arguments:
                out.append(self.block_delta({"type": "input_json_delta", "partial_json": call.arguments}))
        if delta.finish_reason is not None:
            if self.index < 0:  # nothing was said: still one (empty) text block, as in the plain Message
                out += self.open("text")
            out += self.close()
            out.append(event("message_delta", delta=stop_fields(delta.finish_reason, delta.stop_sequence),
                             usage=usage_dict(delta.usage)))
            out.append(event("message_stop"))
            self.done = True
        return out

    def failed(self, error: RequestError) -> list[bytes]:
        return [event("error", error=anthropic_error(error.message, error.status_code)["error"])]

    def ended(self) -> list[bytes]:
        # The engine went away without finishing (it was stopped): say so rather than just ending.
        return [] if self.done else [event("error", error=anthropic_error("the model stopped", 503)["error"])]

    def open(self, kind: str, block: dict | None = None) -> list[bytes]:
        if self.kind == kind and kind != "tool_use":
            return []
        out = self.close()
        self.index += 1
        self.kind = kind
        out.append(event("content_block_start", index=self.index, content_block=block or dict(_EMPTY[kind])))
        return out

    def close(self) -> list[bytes]:
        if self.kind is None:
            return []
        self.kind = None
        return [event("content_block_stop", index=self.index)]

    def block_delta(self, delta: dict) -> bytes:
        return event("content_block_delta", index=self.index, delta=delta)
