"""Detokenizer actor: incremental detokenization, stop strings, fan-out to each request's stream."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from transerve.actors.messages import (
    NewToken, OpenStream, RequestError, RequestEvent, RequestFailed, StepOutput, TextDelta, Usage,
)

log = logging.getLogger(__name__)


@dataclass
class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas that concatenate to decode(all ids).

    Decoding a window of recent tokens and diffing it with the window minus the newest tokens keeps
    multi-byte characters and word-initial spaces right; a trailing U+FFFD means wait for more."""

    tokenizer: object
    stop: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""  # everything decoded so far
    num_sent: int = 0  # characters of `text` already sent
    stopped: bool = False

    def add(self, token_id: int) -> None:
        if self.stopped:
            return
        self.token_ids.append(token_id)
        decode = self.tokenizer.decode
        prefix_text = decode(self.token_ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        new_text = decode(self.token_ids[self.prefix_offset :], skip_special_tokens=True)
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return
        start = max(len(self.text) - max((len(s) for s in self.stop), default=0), 0)
        self.text += new_text[len(prefix_text) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        for stop in self.stop:
            index = self.text.find(stop, start)
            if index != -1:
                self.text = self.text[:index]
                self.stopped = True
                start = 0  # a later stop string may still match earlier in the text

    def take(self, final: bool) -> str:
        """Text that is safe to send: all of it when final, else all but a possible stop-string prefix."""
        end = len(self.text)
        if not final and not self.stopped and self.stop:
            longest = max(len(s) for s in self.stop)
            for cut in range(max(self.num_sent, end - longest + 1), end):  # hold back the longest match
                if any(s.startswith(self.text[cut:]) for s in self.stop):
                    end = cut
                    break
        out = self.text[self.num_sent : end]
        self.num_sent = end
        return out


@dataclass
class Stream:
    sink: ObjectSendStream[RequestEvent]
    decoder: IncrementalDecoder
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


async def detokenizer_actor(tokenizer, inbox: ObjectReceiveStream[OpenStream | StepOutput | RequestFailed]) -> None:
    streams: dict[str, Stream] = {}
    async with inbox:
        try:
            async for message in inbox:
                if isinstance(message, OpenStream):
                    streams[message.request_id] = Stream(message.sink, IncrementalDecoder(tokenizer, message.stop))
                elif isinstance(message, RequestFailed):
                    stream = streams.pop(message.request_id, None)
                    if stream is not None:
                        await _send(stream, RequestError(message.message, message.status_code, message.param), close=True)
                else:
                    for token in message.tokens:
                        stream = streams.get(token.request_id)
                        if stream is not None and await _on_token(stream, token):
                            del streams[token.request_id]
        finally:
            with anyio.CancelScope(shield=True):
                for stream in streams.values():  # shutting down: no request is left hanging
                    await _send(stream, RequestError("the server is shutting down", 503), close=True)


async def _on_token(stream: Stream, token: NewToken) -> bool:
    """Forward one engine token; True when the request's stream is finished."""
    decoder = stream.decoder
    stream.num_prompt_tokens, stream.num_cached_tokens = token.num_prompt_tokens, token.num_cached_tokens
    if token.token_id is not None:
        decoder.add(token.token_id)
    finish_reason = "stop" if decoder.stopped else token.finish_reason
    final = finish_reason is not None
    text = decoder.take(final)
    if not final and not text:
        return False
    usage = Usage(stream.num_prompt_tokens, len(decoder.token_ids), stream.num_cached_tokens) if final else None
    ids = (token.token_id,) if token.token_id is not None else ()
    await _send(stream, TextDelta(text, ids, finish_reason, usage), close=final)
    return final


async def _send(stream: Stream, event: RequestEvent, close: bool) -> None:
    try:
        stream.sink.send_nowait(event)  # sized for every event of the request: never blocks
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass  # the client went away; its abort is on the way
    except anyio.WouldBlock:
        log.error("request stream full; dropping an event")
    if close:
        stream.sink.close()
