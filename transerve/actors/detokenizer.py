"""Detokenizer actor: incremental detokenization, stop strings, output parsing (answer, thoughts, tool
calls), logprob texts, fan-out to each request's stream."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from transerve.actors.messages import (
    NewToken, OpenStream, RequestError, RequestEvent, RequestFailed, StepOutput, TextDelta, TokenLogprob, Usage,
)
from transerve.actors.output_parser import OutputParser
from transerve.actors.tool_formats import marker_tokens
from transerve.engine.step import SampledLogprobs

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers before 0.21
    DecodeStream = None

log = logging.getLogger(__name__)


def decode_stream_for(tokenizer, skip_special_tokens: bool):
    """A `tokenizers` DecodeStream when it gives exactly what `tokenizer.decode` gives (a fast tokenizer
    without transformers' clean-up pass), else None: the windowed decode below serves the others."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if DecodeStream is None or backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", True) is not False:
        return None
    return backend, DecodeStream(skip_special_tokens=skip_special_tokens)


@dataclass
class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas that concatenate to decode(all ids).

    Decoding a window of recent tokens and diffing it with the window minus the newest tokens keeps
    multi-byte characters and word-initial spaces right; a trailing U+FFFD means wait for more. A fast
    tokenizer's DecodeStream runs that same algorithm in Rust (~10x cheaper per token); should it ever
    refuse a token, the window decode here takes over from where it stood."""

    tokenizer: object
    stop: tuple[str, ...] = ()
    # When set, these ids are dropped and every other token is shown, special or not: tool-call and
    # <think> markers that a tokenizer marks special must reach the output parser.
    hidden_ids: frozenset[int] | None = None
    token_ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""  # everything decoded so far
    num_sent: int = 0  # characters of `text` already sent
    stopped: bool = False
    matched: str | None = None  # the stop string that ended the text
    fast: tuple | None = field(default=None, init=False, repr=False)  # (backend tokenizer, DecodeStream) when it fits
    longest_stop: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.fast = decode_stream_for(self.tokenizer, skip_special_tokens=self.hidden_ids is None)
        self.longest_stop = max((len(s) for s in self.stop), default=0)

    def add(self, token_id: int) -> None:
        if self.stopped:
            return
        self.token_ids.append(token_id)
        piece = self._next_piece(token_id)
        if not piece:
            return
        start = max(len(self.text) - self.longest_stop, 0)
        self.text += piece
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        for stop in self.stop:
            index = self.text.find(stop, start)
            if index != -1:
                self.text = self.text[:index]
                self.stopped, self.matched = True, stop
                start = 0  # a later stop string may still match earlier in the text

    def _next_piece(self, token_id: int) -> str | None:
        """The text the newest token completes, if any."""
        if self.fast is not None:
            if self.hidden_ids is not None and token_id in self.hidden_ids:
                return None
            backend, stream = self.fast
            try:
                return stream.step(backend, token_id)
            except Exception:  # e.g. a decode that does not extend the previous one: the window decode copes
                self.fast = None
        decode = self._decode
        prefix_text = decode(self.token_ids[self.prefix_offset : self.read_offset])
        new_text = decode(self.token_ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return None
        return new_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        if self.hidden_ids is None:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode([i for i in ids if i not in self.hidden_ids], skip_special_tokens=False)

    def take(self, final: bool) -> str:
        """Text that is safe to send: all of it when final, else all but a possible stop-string prefix."""
        end = len(self.text)
        if not final and not self.stopped and self.stop:
            for cut in range(max(self.num_sent, end - self.longest_stop + 1), end):  # hold back the longest match
                if any(s.startswith(self.text[cut:]) for s in self.stop):
                    end = cut
                    break
        out = self.text[self.num_sent : end]
        self.num_sent = end
        return out


class TokenTexts:
    """Per-tokenizer lookups the detokenizer repeats: each token's own text (for logprobs), and the
    special token ids (to hide all but the output parser's markers)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.texts: dict[int, str] = {}
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.special = frozenset(tokenizer.all_special_ids) | frozenset(i for i, t in added.items() if getattr(t, "special", False))
        self.hidden: dict[tuple[str, ...], frozenset[int] | None] = {}

    def text(self, token_id: int) -> str:
        text = self.texts.get(token_id)
        if text is None:
            text = self.texts[token_id] = self.tokenizer.decode([token_id], skip_special_tokens=False)
        return text

    def logprob(self, token_id: int, sampled: SampledLogprobs) -> TokenLogprob:
        top = tuple((self.text(i), lp) for i, lp in zip(sampled.top_ids, sampled.top_logprobs))
        return TokenLogprob(self.text(token_id), sampled.logprob, top)

    def hidden_ids(self, markers: tuple[str, ...]) -> frozenset[int] | None:
        """None (the plain decode) unless one of `markers` is a special token of this tokenizer."""
        if markers not in self.hidden:
            ids = {self.tokenizer.convert_tokens_to_ids(m) for m in markers}
            keep = ids & self.special
            self.hidden[markers] = self.special - keep if keep else None
        return self.hidden[markers]


@dataclass
class Stream:
    sink: ObjectSendStream[RequestEvent]
    decoder: IncrementalDecoder
    index: int = 0
    parser: OutputParser | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_reasoning_tokens: int = 0
    pending_ids: list[int] = field(default_factory=list)  # tokens whose text is not sent yet
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)


def open_stream(texts: TokenTexts, message: OpenStream) -> Stream:
    spec = message.parser
    if spec is None:
        return Stream(message.sink, IncrementalDecoder(texts.tokenizer, message.stop), message.index)
    hidden = texts.hidden_ids(marker_tokens(spec.tool_format, spec.reasoning))
    parser = OutputParser(spec.tool_format, spec.reasoning, spec.in_reasoning, spec.parallel_tool_calls)
    return Stream(message.sink, IncrementalDecoder(texts.tokenizer, message.stop, hidden), message.index, parser)


async def detokenizer_actor(tokenizer, inbox: ObjectReceiveStream[OpenStream | StepOutput | RequestFailed]) -> None:
    streams: dict[str, Stream] = {}
    texts = TokenTexts(tokenizer)
    async with inbox:
        try:
            async for message in inbox:
                if isinstance(message, OpenStream):
                    streams[message.request_id] = open_stream(texts, message)
                elif isinstance(message, RequestFailed):
                    stream = streams.pop(message.request_id, None)
                    if stream is not None:
                        error = RequestError(message.message, message.status_code, message.param, stream.index)
                        _send(stream, error, close=True)
                else:
                    for token in message.tokens:
                        stream = streams.get(token.request_id)
                        if stream is not None and await _on_token(stream, token, texts):
                            del streams[token.request_id]
        finally:
            with anyio.CancelScope(shield=True):
                for stream in streams.values():  # shutting down: no request is left hanging
                    _send(stream, RequestError("the server is shutting down", 503, index=stream.index), close=True)


async def _on_token(stream: Stream, token: NewToken, texts: TokenTexts) -> bool:
    """Forward one engine token; True when the request's stream is finished."""
    decoder = stream.decoder
    stream.num_prompt_tokens, stream.num_cached_tokens = token.num_prompt_tokens, token.num_cached_tokens
    if token.token_id is not None:
        decoder.add(token.token_id)
        stream.pending_ids.append(token.token_id)
        if token.logprobs is not None:
            stream.pending_logprobs.append(texts.logprob(token.token_id, token.logprobs))
    finish_reason = "stop" if decoder.stopped else token.finish_reason
    final = finish_reason is not None
    text = decoder.take(final)
    reasoning, tool_calls = "", ()
    parser = stream.parser
    if parser is not None:
        parsed = parser.feed(text, final)
        if parser.done and not final:  # parallel_tool_calls is off and the first call is complete
            decoder.stopped, final, finish_reason = True, True, "stop"
        text, reasoning, tool_calls = parsed.content, parsed.reasoning, tuple(parsed.tool_calls)
        if token.token_id is not None and (reasoning or parser.in_reasoning):
            stream.num_reasoning_tokens += 1
        if parser.num_calls and finish_reason == "stop":
            finish_reason = "tool_calls"
    if not final and not (text or reasoning or tool_calls):
        return False
    usage = None
    if final:
        usage = Usage(stream.num_prompt_tokens, len(decoder.token_ids), stream.num_cached_tokens, stream.num_reasoning_tokens)
    event = TextDelta(text, tuple(stream.pending_ids), finish_reason, usage, stream.index, reasoning, tool_calls,
                      tuple(stream.pending_logprobs), decoder.matched if finish_reason == "stop" else None)
    stream.pending_ids.clear()
    stream.pending_logprobs.clear()
    _send(stream, event, close=final)
    return final


def _send(stream: Stream, event: RequestEvent, close: bool) -> None:
    try:
        stream.sink.send_nowait(event)  # sized for every event of the request: never blocks
    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
        pass  # the client went away; its abort is on the way
    except anyio.WouldBlock:
        log.error("request stream full; dropping an event")
    if close:
        stream.sink.close()
