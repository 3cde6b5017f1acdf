"""One HTTP request's stream of events, from the detokenizer to its handler, that merges what a lagging
handler has not taken yet.

The detokenizer sends a TextDelta per token (or per piece of text it releases). When the handler falls
behind (its socket is full, the event loop is busy), the deltas of a choice that wait for it are merged
into one, as vLLM's output collector merges a lagging consumer's outputs, so each wakeup of the handler
and each write to its socket carries every token that is ready. With one delta waiting nothing changes.

A merged delta reads exactly like the deltas it replaces: texts, token ids and logprobs concatenate in
order, a tool call's argument pieces join, the finish and usage of the last one stand. Deltas of
different kinds (thoughts, answer text, tool calls) are not merged, because the Responses and Messages
streams open one output item per kind in order, and a thought's logprobs must not become the answer's;
nor are tool-call deltas with logprobs (see `_Merged.accepts`).

Memory is bounded by the choices' token budgets (`capacity` events), as a memory object stream's buffer
is; merging only ever shrinks it. The handler waits on a bare asyncio future: Quart and hypercorn run on
asyncio only, and an anyio Event per wakeup was a tenth of the serving stack's CPU per token.
"""

from __future__ import annotations

import asyncio
from collections import deque

import anyio
from anyio.abc import ObjectSendStream

from transerve.actors.messages import RequestError, RequestEvent, TextDelta, TokenLogprob, ToolCallDelta, Usage


def _kind(delta: TextDelta) -> str | None:
    """The one kind of content a delta carries ("" when none, None when mixed); per token, so plain ifs."""
    if delta.tool_calls:
        return None if delta.text or delta.reasoning else "tools"
    if delta.text:
        return None if delta.reasoning else "text"
    return "reasoning" if delta.reasoning else ""


class _Merged:
    """Deltas of one choice being merged; lists, so that a long lag costs linear time, not quadratic."""

    def __init__(self, first: TextDelta) -> None:
        self.index, self.kind = first.index, _kind(first)
        self.texts, self.reasonings = [first.text], [first.reasoning]
        self.token_ids, self.logprobs = list(first.token_ids), list(first.logprobs)
        self.calls: list[list] = []  # [index, id, name, argument pieces]
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.stop_sequence: str | None = None
        self._add_calls(first.tool_calls)

    def accepts(self, delta: TextDelta) -> bool:
        kind = _kind(delta)
        if self.finish_reason is not None or not self.kind or kind not in ("", self.kind):
            return False
        # A tool call's first piece closes the answer's message item: logprobs after it are no longer the
        # message's (the Responses stream), so they must not ride on a delta read before that point.
        return self.kind != "tools" or not delta.logprobs

    def add(self, delta: TextDelta) -> None:
        self.texts.append(delta.text)
        self.reasonings.append(delta.reasoning)
        self.token_ids += delta.token_ids
        self.logprobs += delta.logprobs
        self._add_calls(delta.tool_calls)
        self.finish_reason, self.usage, self.stop_sequence = delta.finish_reason, delta.usage, delta.stop_sequence

    def _add_calls(self, calls: tuple[ToolCallDelta, ...]) -> None:
        for call in calls:
            if call.name is None and self.calls and self.calls[-1][0] == call.index:
                self.calls[-1][3].append(call.arguments)  # more arguments of the call already open
            else:
                self.calls.append([call.index, call.id, call.name, [call.arguments]])

    def delta(self) -> TextDelta:
        calls = tuple(ToolCallDelta(index, id_, name, "".join(args)) for index, id_, name, args in self.calls)
        logprobs: tuple[TokenLogprob, ...] = tuple(self.logprobs)
        return TextDelta("".join(self.texts), tuple(self.token_ids), self.finish_reason, self.usage, self.index,
                         "".join(self.reasonings), calls, logprobs, self.stop_sequence)


class DeltaStream:
    """The receive end, owned by EngineClient.generate; `sender()` gives each choice its own send end, and
    the stream ends once every send end is closed and every event taken."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._events: deque[TextDelta | RequestError | _Merged] = deque()
        self._num_senders = 0
        self._closed = False
        self._waiter: asyncio.Future | None = None

    def __len__(self) -> int:
        return len(self._events)

    def sender(self) -> DeltaSender:
        self._num_senders += 1
        return DeltaSender(self)

    def put(self, event: RequestEvent) -> None:
        if self._closed:
            raise anyio.BrokenResourceError  # the handler is gone
        events = self._events
        if events and isinstance(event, TextDelta):
            for position in range(len(events) - 1, -1, -1):  # the choice's newest waiting event, if any
                waiting = events[position]
                if isinstance(waiting, RequestError):
                    break
                if waiting.index != event.index:
                    continue
                if isinstance(waiting, TextDelta):
                    waiting = _Merged(waiting)
                if waiting.accepts(event):
                    waiting.add(event)
                    events[position] = waiting
                    return
                break
        if len(events) >= self.capacity:
            raise anyio.WouldBlock
        events.append(event)
        self._wake()

    def sender_closed(self) -> None:
        self._num_senders -= 1
        if self._num_senders == 0:
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def receive_nowait(self) -> RequestEvent:
        """Every delta of a choice that waits, merged into one; WouldBlock when none, EndOfStream at the end."""
        if not self._events:
            raise anyio.EndOfStream if self._num_senders == 0 else anyio.WouldBlock
        event = self._events.popleft()
        return event.delta() if isinstance(event, _Merged) else event

    async def receive(self) -> RequestEvent:
        while True:
            try:
                return self.receive_nowait()
            except anyio.WouldBlock:
                pass
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter  # a CancelledError (the client left) goes on up
            finally:
                self._waiter = None

    def close(self) -> None:
        """The handler is done: whatever the detokenizer sends from now on is dropped."""
        self._closed = True
        self._events.clear()


class DeltaSender(ObjectSendStream[RequestEvent]):
    """One choice's send end. `send_nowait` never waits: the stream holds every event a choice can make."""

    def __init__(self, stream: DeltaStream) -> None:
        self._stream: DeltaStream | None = stream

    def send_nowait(self, item: RequestEvent) -> None:
        if self._stream is None:
            raise anyio.ClosedResourceError
        self._stream.put(item)

    async def send(self, item: RequestEvent) -> None:
        self.send_nowait(item)

    def close(self) -> None:
        if self._stream is not None:
            self._stream, stream = None, self._stream
            stream.sender_closed()

    async def aclose(self) -> None:
        self.close()
