"""POST /v1/audio/transcriptions (multipart/form-data), shaped like OpenAI's: json, text,
verbose_json (segments), srt, vtt, and streamed `transcript.text.delta` / `transcript.text.done` events."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

import anyio
from quart import Blueprint, Response, current_app, jsonify, request

from transerve.actors.transcriber import TranscribeEvent, TranscribeFailed, TranscriptionEngine, WindowsDone, WindowToken
from transerve.engine import transcript
from transerve.engine.whisper import TIME_PRECISION, DecodeOptions, WindowResult, log_mel_features
from transerve.http.errors import OpenAIError, error_body
from transerve.http.sse import SSE_HEADERS, sse
from transerve.media.audio import AudioError, AudioWindow, decode_audio, split_windows

bp = Blueprint("transcriptions", __name__)
ENDPOINT = "/v1/audio/transcriptions"
MAX_AUDIO_BYTES = 25 * 1024 * 1024  # OpenAI's own limit for one file
FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
TIMED_FORMATS = frozenset({"verbose_json", "srt", "vtt"})  # these ask Whisper for timestamps
_FIELDS = frozenset({"model", "language", "prompt", "response_format", "temperature", "stream",
                     "timestamp_granularities[]", "timestamp_granularities", "include[]", "include"})


def _form_options(form) -> tuple[str, float, bool, str | None, str | None]:
    unknown = sorted(set(form) - _FIELDS)
    if unknown:
        raise OpenAIError(f"unknown field '{unknown[0]}'", 400, unknown[0], "unknown_parameter")
    response_format = form.get("response_format") or "json"
    if response_format not in FORMATS:
        raise OpenAIError(f"response_format must be one of {', '.join(FORMATS)}, got {response_format!r}", 400,
                          "response_format")
    try:
        temperature = float(form.get("temperature") or 0)
    except ValueError:
        raise OpenAIError("temperature must be a number between 0 and 1", 400, "temperature") from None
    if not 0 <= temperature <= 1:
        raise OpenAIError("temperature must be a number between 0 and 1", 400, "temperature")
    stream = (form.get("stream") or "false").lower()
    if stream not in ("true", "false"):
        raise OpenAIError("stream must be true or false", 400, "stream")
    if stream == "true" and response_format not in ("json", "text"):
        raise OpenAIError("stream needs response_format json or text (timed formats come whole)", 400, "stream")
    for granularity in form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities"):
        if granularity != "segment":
            raise OpenAIError("timestamp_granularities: only 'segment' is supported (no word timestamps)", 400,
                              "timestamp_granularities")
    for item in form.getlist("include[]") + form.getlist("include"):
        raise OpenAIError(f"include: {item!r} is not supported", 400, "include")
    return response_format, temperature, stream == "true", form.get("language") or None, form.get("prompt") or None


async def _audio_bytes() -> bytes:
    if request.mimetype != "multipart/form-data":
        raise OpenAIError("send the audio as multipart/form-data with a `file` field", 400, "file", "invalid_content_type")
    files = await request.files
    upload = files.get("file")
    if upload is None:
        raise OpenAIError("the `file` field is missing: attach the audio as a file part named `file`", 400, "file")
    data = upload.read(MAX_AUDIO_BYTES + 1)
    if len(data) > MAX_AUDIO_BYTES:
        raise OpenAIError(f"the audio file is larger than the limit of {MAX_AUDIO_BYTES} bytes", 400, "file",
                          "file_too_large")
    return data


@bp.post(ENDPOINT)
async def transcriptions():
    data = await _audio_bytes()
    form = await request.form
    response_format, temperature, stream, language, prompt = _form_options(form)
    engine = await current_app.config["MODELS"].get(form.get("model"), task="transcription")
    t = engine.transcriber
    codes = {code for code, _ in t.language_ids}
    if language is not None and t.multilingual and language not in codes:
        raise OpenAIError(f"language {language!r} is not one this model knows (ISO-639-1 codes such as "
                          f"{', '.join(sorted(codes)[:5])})", 400, "language")
    try:
        samples = await anyio.to_thread.run_sync(decode_audio, data, engine.sampling_rate)
    except AudioError as exc:
        raise OpenAIError(str(exc), 400, "file", "invalid_audio") from exc
    windows = split_windows(samples, engine.sampling_rate)
    features = await anyio.to_thread.run_sync(log_mel_features, t, [w.samples for w in windows])
    options = DecodeOptions(prompt, temperature, timestamps=response_format in TIMED_FORMATS)
    events = engine.transcribe(features, language, options, stream_tokens=stream)
    duration = len(samples) / engine.sampling_rate
    if stream:
        return _stream(engine, events, len(windows)), 200, SSE_HEADERS
    async with aclosing(events):
        results = await _results(events)
    return _respond(engine, response_format, windows, results, temperature, duration)


async def _results(events: AsyncIterator[TranscribeEvent]) -> tuple[WindowResult, ...]:
    async for event in events:
        if isinstance(event, WindowsDone):
            return event.results
        if isinstance(event, TranscribeFailed):
            raise OpenAIError(event.message, event.status_code)
    raise OpenAIError("the transcription ended without a result (the server is shutting down)", 503)


def window_segments(engine: TranscriptionEngine, windows: Sequence[AudioWindow],
                    results: Sequence[WindowResult]) -> list[tuple[int, transcript.Segment]]:
    """(window index, segment) for every segment of every window, in time order."""
    t = engine.transcriber
    specials = set(t.processor.tokenizer.all_special_ids)
    out = []
    for index, (window, result) in enumerate(zip(windows, results)):
        kept = [(tok, lp) for tok, lp in zip(result.token_ids, result.logprobs) if tok not in specials]
        tokens, logprobs = [k[0] for k in kept], [k[1] for k in kept]
        for segment in transcript.split_segments(tokens, logprobs, t.timestamp_begin, TIME_PRECISION, window.start, window.end):
            out.append((index, segment))
    return out


def _respond(engine, response_format: str, windows, results, temperature: float, duration: float):
    decode = engine.transcriber.processor.tokenizer.decode
    segments = window_segments(engine, windows, results)
    texts = [decode(list(s.token_ids), skip_special_tokens=True) for _, s in segments]
    text = transcript.join_texts(texts)
    if response_format == "json":
        return jsonify({"text": text, "usage": {"type": "duration", "seconds": round(duration, 3)}})
    if response_format == "text":
        return Response(text + "\n", content_type="text/plain; charset=utf-8")
    cues = [(s.start, s.end, t) for (_, s), t in zip(segments, texts)]
    if response_format == "srt":
        return Response(transcript.render_srt(cues), content_type="text/plain; charset=utf-8")
    if response_format == "vtt":
        return Response(transcript.render_vtt(cues), content_type="text/vtt; charset=utf-8")
    from transformers.models.whisper.tokenization_whisper import LANGUAGES

    language = results[0].language if results else "en"
    return jsonify({
        "task": "transcribe",
        "language": LANGUAGES.get(language, language),
        "duration": round(duration, 3),
        "text": text,
        "segments": [{
            "id": i, "seek": int(round(windows[w].start * 100)),  # in 10 ms mel frames, as Whisper counts
            "start": round(s.start, 3), "end": round(s.end, 3), "text": t, "tokens": list(s.token_ids),
            "temperature": temperature, "avg_logprob": transcript.avg_logprob(s),
            "compression_ratio": transcript.compression_ratio(t), "no_speech_prob": results[w].no_speech_prob,
        } for i, ((w, s), t) in enumerate(zip(segments, texts))],
        "usage": {"type": "duration", "seconds": round(duration, 3)},
    })


async def _stream(engine: TranscriptionEngine, events: AsyncIterator[TranscribeEvent], num_windows: int):
    tokenizer = engine.transcriber.processor.tokenizer
    eos = engine.transcriber.model.generation_config.eos_token_id
    eos_ids = set(eos) if isinstance(eos, list) else {eos}

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    tokens: list[list[int]] = [[] for _ in range(num_windows)]
    finished = [False] * num_windows
    sent = ""
    async with aclosing(events):
        async for event in events:
            if isinstance(event, WindowToken):
                if finished[event.window]:
                    continue  # a finished window keeps receiving padding while others decode
                if event.token_id in eos_ids:
                    finished[event.window] = True
                else:
                    tokens[event.window].append(event.token_id)
                delta = transcript.stream_delta(sent, transcript.streamed_text(tokens, finished, decode))
            elif isinstance(event, WindowsDone):
                texts = [decode([t for t in r.token_ids]) for r in event.results]
                text = transcript.join_texts(texts)
                delta = text[len(sent):] if text.startswith(sent) else ""  # the end: unfinished characters too
                if delta:
                    yield sse({"type": "transcript.text.delta", "delta": delta})
                output = sum(len(r.token_ids) for r in event.results)
                audio = num_windows * engine.transcriber.model.config.max_source_positions
                yield sse({"type": "transcript.text.done", "text": text,
                           "usage": {"type": "tokens", "input_tokens": audio, "output_tokens": output,
                                     "total_tokens": audio + output, "input_token_details": {"audio_tokens": audio}}})
                return
            else:
                yield sse(error_body(event.message, event.status_code))
                return
            if delta:
                sent += delta
                yield sse({"type": "transcript.text.delta", "delta": delta})
