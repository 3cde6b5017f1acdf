"""Whisper's output tokens to timed segments and streamed text, segments to SRT and WebVTT, and the
text events a transcription yields. Pure functions and frozen types.

A window's tokens come from one 30 s window starting at `window.start` seconds. With timestamps,
Whisper writes `<|t0|> text <|t1|>` pairs (times relative to the window); without, the whole window
is one segment.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    start: float  # seconds from the start of the file
    end: float
    token_ids: tuple[int, ...]  # text tokens only (no timestamps, no special tokens)
    logprobs: tuple[float, ...]  # the decoder's log probability of each of the window's sampled tokens here


# What TranscriptionClient.transcribe yields, as the detokenizer's TextDelta is for text models.
@dataclass(frozen=True)
class TranscriptSegment:
    """A timed piece of the transcript, as verbose_json, SRT and WebVTT show it."""

    start: float  # seconds from the start of the file
    end: float
    text: str
    token_ids: tuple[int, ...]
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float  # of the segment's window
    window_start: float  # seconds: where the segment's 30 s window starts


@dataclass(frozen=True)
class TranscriptDelta:
    text: str  # the next piece of the transcript (streamed requests only)


@dataclass(frozen=True)
class TranscriptDone:
    text: str  # the whole transcript: what the deltas added up to
    language: str  # its name as OpenAI writes it ("english")
    duration: float  # seconds of audio
    segments: tuple[TranscriptSegment, ...]
    audio_tokens: int  # encoder positions of every window
    output_tokens: int  # tokens the decoder wrote


@dataclass(frozen=True)
class TranscriptError:
    message: str
    status_code: int
    param: str | None = None
    code: str | None = None


TranscriptEvent = TranscriptDelta | TranscriptDone | TranscriptError


def split_segments(token_ids: Sequence[int], logprobs: Sequence[float], timestamp_begin: int, time_precision: float,
                   start: float, end: float) -> list[Segment]:
    """Cut a window's tokens at Whisper's timestamp tokens (ids from `timestamp_begin` on).

    Tokens outside any timestamp pair belong to a segment that starts at the last time seen (or the
    window's start) and ends at the next time (or the window's end)."""
    segments: list[Segment] = []
    seg_start: float | None = None
    text: list[int] = []
    probs: list[float] = []
    for token, logprob in zip(token_ids, logprobs):
        if token < timestamp_begin:
            text.append(token)
            probs.append(logprob)
            continue
        time = min(start + (token - timestamp_begin) * time_precision, end)
        if text:
            opened = seg_start if seg_start is not None else start
            segments.append(Segment(opened, max(time, opened), tuple(text), tuple(probs)))
            text, probs, seg_start = [], [], None
        else:
            seg_start = time  # the opening timestamp of the next segment
    if text:
        segments.append(Segment(seg_start if seg_start is not None else start, end, tuple(text), tuple(probs)))
    return segments


def avg_logprob(segment: Segment) -> float:
    return sum(segment.logprobs) / len(segment.logprobs) if segment.logprobs else 0.0


def compression_ratio(text: str) -> float:
    """As Whisper computes it: text bytes over zlib-compressed bytes; above 2.4 means repetitive."""
    data = text.encode()
    return len(data) / len(zlib.compress(data)) if data else 0.0


def join_texts(texts: Sequence[str]) -> str:
    """The file's text: the segments' stripped texts, one space apart."""
    return " ".join(t for t in (t.strip() for t in texts) if t)


def format_timestamp(seconds: float, decimal_marker: str) -> str:
    """HH:MM:SS,mmm (SRT) or HH:MM:SS.mmm (WebVTT)."""
    millis = int(round(max(seconds, 0.0) * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{millis:03d}"


def render_srt(cues: Sequence[tuple[float, float, str]]) -> str:
    blocks = [f"{i}\n{format_timestamp(s, ',')} --> {format_timestamp(e, ',')}\n{text.strip()}\n"
              for i, (s, e, text) in enumerate(cues, start=1)]
    return "\n".join(blocks)


def render_vtt(cues: Sequence[tuple[float, float, str]]) -> str:
    blocks = [f"{format_timestamp(s, '.')} --> {format_timestamp(e, '.')}\n{text.strip()}\n" for s, e, text in cues]
    return "WEBVTT\n\n" + "\n".join(blocks)


def stream_delta(sent: str, text: str) -> str:
    """What to send next of `text` when `sent` went out already: nothing while the text ends in an
    unfinished UTF-8 character (U+FFFD) or no longer extends what was sent."""
    if not text.startswith(sent) or text.endswith("\ufffd"):
        return ""
    return text[len(sent):]


def streamed_text(windows: Sequence[Sequence[int]], finished: Sequence[bool], decode: Callable[[list[int]], str]) -> str:
    """The text that can be shown while windows decode in parallel: the finished windows in order,
    then the first unfinished one so far (later windows wait their turn)."""
    texts = []
    for tokens, done in zip(windows, finished):
        texts.append(decode(list(tokens)))
        if not done:
            break
    return join_texts(texts)


class StreamedTranscript:
    """The text of windows decoding in parallel, token by token: `add` returns what can be sent now."""

    def __init__(self, num_windows: int, eos_token_ids: frozenset[int], decode: Callable[[list[int]], str]) -> None:
        self.tokens: list[list[int]] = [[] for _ in range(num_windows)]
        self.finished = [False] * num_windows
        self.eos_token_ids = eos_token_ids
        self.decode = decode
        self.sent = ""

    def add(self, window: int, token_id: int) -> str:
        if self.finished[window]:
            return ""  # a finished window keeps receiving padding while others decode
        if token_id in self.eos_token_ids:
            self.finished[window] = True
        else:
            self.tokens[window].append(token_id)
        delta = stream_delta(self.sent, streamed_text(self.tokens, self.finished, self.decode))
        self.sent += delta
        return delta

    def rest(self, text: str) -> str:
        """What is left of the whole `text` once decoding ended (unfinished characters included)."""
        return text[len(self.sent):] if text.startswith(self.sent) else ""
