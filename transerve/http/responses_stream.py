"""The Responses event stream: `response.created` … `response.completed`, one output item at a time.

Thoughts, answer text and tool calls arrive interleaved as the model writes them; each change of kind
closes the open output item (its `.done` events) and opens the next (`output_item.added`), so the
client sees the same items, in the same order, as the plain Response. A failure after the stream has
started ends it with `response.failed`, never with a cut connection.
"""

from __future__ import annotations

from transerve.actors.messages import RequestError, TextDelta
from transerve.http.output import logprob_entries
from transerve.http.response_items import finished, function_item, message_item, new_id, reasoning_item
from transerve.http.sse import sse


class _Item:
    def __init__(self, kind: str, item_id: str, output_index: int, call_id: str = "", name: str = "") -> None:
        self.kind, self.id, self.output_index = kind, item_id, output_index
        self.call_id, self.name = call_id, name
        self.text = ""
        self.logprobs: list[dict] = []


class ResponseStream:
    """The events of one Response (see output.stream for the loop around it)."""

    def __init__(self, base: dict, logprobs: bool) -> None:
        self.base = base
        self.logprobs = logprobs
        self.sequence_number = 0
        self.items: list[dict] = []  # finished output items
        self.current: _Item | None = None
        self.status = "completed"
        self.done = False

    def start(self) -> list[bytes]:
        return [self.event("response.created", response={**self.base, "status": "queued"}),
                self.event("response.in_progress", response={**self.base, "status": "in_progress"})]

    def delta(self, event: TextDelta) -> list[bytes]:
        out = self.on_delta(event)
        if event.finish_reason is not None:
            if not self.items and self.current is None:  # nothing was said: still one (empty) message
                out += self.open("message")
            out += self.close()
            response = finished(self.base, self.items, event.finish_reason, event.usage)
            out.append(self.event("response.incomplete" if response["status"] == "incomplete" else "response.completed",
                                  response=response))
            self.done = True
        return out

    def failed(self, error: RequestError) -> list[bytes]:
        return [self._failed(error.message)]

    def ended(self) -> list[bytes]:
        # The engine went away without finishing (it was stopped): say so rather than just ending.
        return [] if self.done else [self._failed("the model stopped")]

    def _failed(self, message: str) -> bytes:
        failed = {**self.base, "status": "failed", "output": self.items, "error": {"code": "server_error", "message": message}}
        return self.event("response.failed", response=failed)

    def event(self, kind: str, **fields) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return sse(data, event=kind)

    def _item(self, item: _Item, status: str) -> dict:
        if item.kind == "reasoning":
            return reasoning_item(item.id, item.text, status)
        if item.kind == "message":
            return message_item(item.id, item.text, item.logprobs if self.logprobs else None, status)
        return function_item(item.id, item.call_id, item.name, item.text, status)

    def _part(self, item: _Item) -> dict:
        if item.kind == "reasoning":
            return {"type": "reasoning_text", "text": item.text}
        return {"type": "output_text", "text": item.text, "annotations": [], "logprobs": item.logprobs if self.logprobs else []}

    def open(self, kind: str, call_id: str = "", name: str = "") -> list[bytes]:
        out = self.close()
        item = self.current = _Item(kind, new_id({"reasoning": "rs", "message": "msg"}.get(kind, "fc")), len(self.items),
                                    call_id, name)
        out.append(self.event("response.output_item.added", output_index=item.output_index, item=self._item(item, "in_progress")))
        if kind != "function_call":
            empty = _Item(kind, item.id, item.output_index)
            out.append(self.event("response.content_part.added", item_id=item.id, output_index=item.output_index,
                                  content_index=0, part=self._part(empty)))
        return out

    def close(self) -> list[bytes]:
        item, out = self.current, []
        if item is None:
            return out
        where = {"item_id": item.id, "output_index": item.output_index}
        if item.kind == "reasoning":
            out.append(self.event("response.reasoning_text.done", **where, content_index=0, text=item.text))
        elif item.kind == "message":
            out.append(self.event("response.output_text.done", **where, content_index=0, text=item.text,
                                  logprobs=item.logprobs if self.logprobs else []))
        else:
            out.append(self.event("response.function_call_arguments.done", **where, arguments=item.text))
        if item.kind != "function_call":
            out.append(self.event("response.content_part.done", **where, content_index=0, part=self._part(item)))
        done = self._item(item, self.status)
        out.append(self.event("response.output_item.done", output_index=item.output_index, item=done))
        self.items.append(done)
        self.current = None
        return out

    def on_delta(self, event: TextDelta) -> list[bytes]:
        out: list[bytes] = []
        if event.finish_reason == "length":
            self.status = "incomplete"
        if event.reasoning:
            if self.current is None or self.current.kind != "reasoning":
                out += self.open("reasoning")
            self.current.text += event.reasoning
            out.append(self.event("response.reasoning_text.delta", item_id=self.current.id,
                                  output_index=self.current.output_index, content_index=0, delta=event.reasoning))
        in_message = self.current is not None and self.current.kind == "message"
        if event.text or (self.logprobs and event.logprobs and in_message):  # logprobs of held-back text: still the message's
            if not in_message:
                out += self.open("message")
            entries = logprob_entries(event.logprobs) if self.logprobs else []
            self.current.text += event.text
            self.current.logprobs += entries
            out.append(self.event("response.output_text.delta", item_id=self.current.id, output_index=self.current.output_index,
                                  content_index=0, delta=event.text, logprobs=entries))
        for delta in event.tool_calls:
            if delta.name is not None:
                out += self.open("function_call", delta.id or "", delta.name)
            if delta.arguments and self.current is not None:
                self.current.text += delta.arguments
                out.append(self.event("response.function_call_arguments.delta", item_id=self.current.id,
                                      output_index=self.current.output_index, delta=delta.arguments))
        return out
