"""What the HTTP layer sees of a Whisper model: `transcribe(audio, ...)` yields text events.

Each request does its own work around the shared batch, in the request's task: decode the file, cut
30 s windows and compute their log-mel features (in worker threads), hand them to the transcriber
actor, then turn the tokens it sends back into text: deltas while the windows decode (when
streaming), timed segments and the whole text at the end (`engine.transcript` events). Bad input
is a `TranscriptError` with a 4xx status before anything else is yielded.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence

import anyio
import numpy as np
from anyio.abc import ObjectSendStream

from transerve.actors.transcriber import TranscribeEvent, TranscribeFailed, TranscribeJob, WindowsDone, WindowToken
from transerve.engine import transcript
from transerve.engine.transcript import (
    StreamedTranscript, TranscriptDelta, TranscriptDone, TranscriptError, TranscriptEvent, TranscriptSegment,
)
from transerve.engine.whisper import TIME_PRECISION, DecodeOptions, Transcriber, WindowResult, log_mel_features
from transerve.media.audio import AudioError, AudioWindow, decode_audio, split_windows


class BatchingClient:
    """The bookkeeping `Models` needs of any engine (in_flight, last_used, closed, aclose), for the clients of
    the batching actors (this one and actors/embedding_client.py), which report no scheduler or KV cache."""

    stats = None

    def __init__(self, model_id: str, inbox: ObjectSendStream) -> None:
        self.model_id = model_id
        self.created = int(time.time())
        self.in_flight = 0
        self.last_used = anyio.current_time()
        self.closed = anyio.Event()
        self._inbox = inbox

    def touch(self) -> None:
        self.last_used = anyio.current_time()

    async def aclose(self) -> None:
        self.closed.set()
        await self._inbox.aclose()


class TranscriptionClient(BatchingClient):
    """`transcribe(...)`; its batches show in the transerve_transcription_* metrics."""

    def __init__(self, t: Transcriber, inbox: ObjectSendStream[TranscribeJob]) -> None:
        super().__init__(t.model_id, inbox)
        self._t = t
        self._tokenizer = t.processor.tokenizer
        self._specials = frozenset(self._tokenizer.all_special_ids)
        eos = t.model.generation_config.eos_token_id
        self._eos_ids = frozenset(eos if isinstance(eos, list) else [eos])

    async def transcribe(self, audio: bytes, language: str | None, options: DecodeOptions,
                         stream: bool = False) -> AsyncIterator[TranscriptEvent]:
        """TranscriptDeltas when streaming, then one TranscriptDone; or a TranscriptError, then nothing."""
        self.in_flight += 1
        try:
            if options.task == "translate" and not self._t.multilingual:
                yield TranscriptError(f"{self.model_id} is an English-only model: it cannot translate (use a multilingual "
                                      "Whisper)", 400, "model")
                return
            codes = {code for code, _ in self._t.language_ids}
            if language is not None and self._t.multilingual and language not in codes:
                yield TranscriptError(f"language {language!r} is not one this model knows (ISO-639-1 codes such as "
                                      f"{', '.join(sorted(codes)[:5])})", 400, "language")
                return
            try:
                samples = await anyio.to_thread.run_sync(decode_audio, audio, self._t.sampling_rate)
            except AudioError as exc:
                yield TranscriptError(str(exc), 400, "file", "invalid_audio")
                return
            windows = split_windows(samples, self._t.sampling_rate)
            features = await anyio.to_thread.run_sync(log_mel_features, self._t, [w.samples for w in windows])
            duration = len(samples) / self._t.sampling_rate
            async for event in self._decode(features, windows, language, options, stream, duration):
                yield event
        finally:
            self.in_flight -= 1
            self.touch()

    async def _decode(self, features: np.ndarray, windows: Sequence[AudioWindow], language: str | None,
                      options: DecodeOptions, stream: bool, duration: float) -> AsyncIterator[TranscriptEvent]:
        max_tokens = self._t.model.config.max_target_positions  # the decoder's own limit
        sink, source = anyio.create_memory_object_stream[TranscribeEvent](len(features) * (max_tokens + 1) + 1)
        async with source:
            with sink:
                try:
                    await self._inbox.send(TranscribeJob(uuid.uuid4().hex, features, language, options, sink.clone(), stream))
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    yield TranscriptError("this model was just unloaded; send the request again", 503)
                    return
            streamed = StreamedTranscript(len(windows), self._eos_ids, self._text)
            async for event in source:
                if isinstance(event, WindowToken):
                    if delta := streamed.add(event.window, event.token_id):
                        yield TranscriptDelta(delta)
                elif isinstance(event, WindowsDone):
                    done = self._done(windows, event.results, duration)
                    if stream and (rest := streamed.rest(done.text)):
                        yield TranscriptDelta(rest)
                    yield done
                    return
                elif isinstance(event, TranscribeFailed):
                    yield TranscriptError(event.message, event.status_code)
                    return
        yield TranscriptError("the transcription ended without a result (the server is shutting down)", 503)

    def _text(self, token_ids: list[int]) -> str:
        return self._tokenizer.decode(token_ids, skip_special_tokens=True)

    def _done(self, windows: Sequence[AudioWindow], results: Sequence[WindowResult], duration: float) -> TranscriptDone:
        segments = []
        for window, result in zip(windows, results):
            kept = [(tok, lp) for tok, lp in zip(result.token_ids, result.logprobs) if tok not in self._specials]
            tokens, logprobs = [k[0] for k in kept], [k[1] for k in kept]
            for s in transcript.split_segments(tokens, logprobs, self._t.timestamp_begin, TIME_PRECISION, window.start,
                                               window.end):
                text = self._text(list(s.token_ids))
                segments.append(TranscriptSegment(s.start, s.end, text, s.token_ids, transcript.avg_logprob(s),
                                                  transcript.compression_ratio(text), result.no_speech_prob, window.start))
        return TranscriptDone(
            text=transcript.join_texts([s.text for s in segments]),
            language=_language_name(results[0].language if results else "en"),
            duration=duration, segments=tuple(segments),
            audio_tokens=len(windows) * self._t.model.config.max_source_positions,
            output_tokens=sum(len(r.token_ids) for r in results),
        )


def _language_name(code: str) -> str:
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    return LANGUAGES.get(code, code)
