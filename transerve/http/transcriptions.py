"""POST /v1/audio/transcriptions and /v1/audio/translations (multipart/form-data), shaped like OpenAI's:
json, text, verbose_json (segments), srt, vtt, and (transcriptions) streamed `transcript.text.delta` /
`transcript.text.done` events. A translation is Whisper's translate task: the same decoding into English.

The handler reads the audio part, validates the form (`protocol.transcriptions`), hands the audio to
the model's TranscriptionClient and shapes the text events it yields; decoding the audio and the
model's work happen behind the client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from quart import Blueprint, Response, current_app, jsonify, request

from transerve.engine import transcript
from transerve.engine.transcript import TranscriptDelta, TranscriptDone, TranscriptError, TranscriptEvent
from transerve.http.errors import OpenAIError, error_body
from transerve.http.protocol.base import FORM
from transerve.http.protocol.transcriptions import MAX_AUDIO_BYTES, AudioRequest, TranscriptionRequest, TranslationRequest
from transerve.http.sse import SSE_HEADERS, sse

bp = Blueprint("transcriptions", __name__)


async def _audio_bytes() -> bytes:
    if request.mimetype != FORM:
        raise OpenAIError("send the audio as multipart/form-data with a `file` field", 400, "file", "invalid_content_type")
    files = await request.files
    upload = files.get("file")
    if upload is None:
        raise OpenAIError("the `file` field is missing: attach the audio as a file part named `file`", 400, "file")
    others = [name for name in files if name != "file"]
    if others:  # a field sent as a file part (curl -F prompt=@notes.txt) would otherwise go unread
        raise OpenAIError(f"{others[0]}: only `file` may be a file part; other fields are plain text", 400, others[0],
                          "unsupported_parameter")
    data = upload.read(MAX_AUDIO_BYTES + 1)
    if len(data) > MAX_AUDIO_BYTES:
        raise OpenAIError(f"the audio file is larger than the limit of {MAX_AUDIO_BYTES} bytes", 400, "file",
                          "file_too_large")
    return data


@bp.post(TranscriptionRequest.endpoint)
async def transcriptions():
    return await _audio_text(TranscriptionRequest)


@bp.post(TranslationRequest.endpoint)
async def translations():
    return await _audio_text(TranslationRequest)


async def _audio_text(kind: type[AudioRequest]):
    audio = await _audio_bytes()  # first: a missing or oversized file is the error to report
    body = kind.from_form(await request.form, audio)
    engine = await current_app.config["MODELS"].get(body.model, task="transcription")
    events = engine.transcribe(body.file, body.spoken_language(), body.decode_options(), stream=body.streamed())
    first = await anext(events)
    if isinstance(first, TranscriptError):  # bad audio or options: a 4xx status, not a stream
        await events.aclose()
        raise OpenAIError(first.message, first.status_code, first.param, first.code)
    if body.streamed():
        return _stream(first, events), 200, SSE_HEADERS
    async with aclosing(events):
        event = first
        while not isinstance(event, TranscriptDone):
            if isinstance(event, TranscriptError):
                raise OpenAIError(event.message, event.status_code, event.param, event.code)
            event = await anext(events)  # deltas come only when streaming
    return _respond(body.response_format, event, body.temperature, body.task)


def _respond(response_format: str, done: TranscriptDone, temperature: float, task: str):
    usage = {"type": "duration", "seconds": round(done.duration, 3)}
    if response_format == "json":
        return jsonify({"text": done.text, "usage": usage})
    if response_format == "text":
        return Response(done.text + "\n", content_type="text/plain; charset=utf-8")
    cues = [(s.start, s.end, s.text) for s in done.segments]
    if response_format == "srt":
        return Response(transcript.render_srt(cues), content_type="text/plain; charset=utf-8")
    if response_format == "vtt":
        return Response(transcript.render_vtt(cues), content_type="text/vtt; charset=utf-8")
    return jsonify({
        "task": task,
        "language": "english" if task == "translate" else done.language,
        "duration": round(done.duration, 3),
        "text": done.text,
        "segments": [{
            "id": i, "seek": int(round(s.window_start * 100)),  # in 10 ms mel frames, as Whisper counts
            "start": round(s.start, 3), "end": round(s.end, 3), "text": s.text, "tokens": list(s.token_ids),
            "temperature": temperature, "avg_logprob": s.avg_logprob, "compression_ratio": s.compression_ratio,
            "no_speech_prob": s.no_speech_prob,
        } for i, s in enumerate(done.segments)],
        "usage": usage,
    })


async def _stream(first: TranscriptEvent, events: AsyncIterator[TranscriptEvent]):
    async with aclosing(events):
        event: TranscriptEvent | None = first
        while event is not None:
            if isinstance(event, TranscriptDelta):
                yield sse({"type": "transcript.text.delta", "delta": event.text})
            elif isinstance(event, TranscriptDone):
                yield sse({"type": "transcript.text.done", "text": event.text, "usage": {
                    "type": "tokens", "input_tokens": event.audio_tokens, "output_tokens": event.output_tokens,
                    "total_tokens": event.audio_tokens + event.output_tokens,
                    "input_token_details": {"audio_tokens": event.audio_tokens}}})
                return
            else:  # an error mid-stream ends the stream with an error event
                yield sse(error_body(event.message, event.status_code, event.param, event.code))
                return
            event = await anext(events, None)
