"""Pure pieces of transcription: audio decoding and windows, segments, SRT/WebVTT, streamed text, batching."""

from __future__ import annotations

import io
import struct

import anyio
import numpy as np
import pytest
import soundfile

from transerve.actors.transcriber import TranscribeJob, group_by_options, take_waiting
from transerve.engine import transcript
from transerve.engine.whisper import DecodeOptions
from transerve.media.audio import AudioError, decode_audio, split_windows


def wav_bytes(samples: np.ndarray, rate: int, fmt: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format=fmt)
    return buffer.getvalue()


def tone(seconds: float, rate: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_decode_mixes_to_mono_and_resamples():
    left, right = tone(1.0, 44100), np.zeros(44100, dtype=np.float32)
    out = decode_audio(wav_bytes(np.stack([left, right], axis=1), 44100), 16000)
    assert out.dtype == np.float32 and out.shape == (16000,)
    # Mixing halves a channel that is alone; resampling keeps a 440 Hz tone at 440 Hz.
    assert abs(np.abs(out).max() - 0.25) < 0.01
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(np.argmax(spectrum) * 16000 / len(out) - 440) < 2


@pytest.mark.parametrize("fmt", ["FLAC", "OGG"])
def test_decode_reads_flac_and_ogg(fmt):
    out = decode_audio(wav_bytes(tone(0.5, 16000), 16000, fmt), 16000)
    assert out.shape == (8000,)
    assert np.corrcoef(out, tone(0.5, 16000))[0, 1] > 0.99


@pytest.mark.parametrize("data, words", [
    (b"", "empty"),
    (b"this is plain text, not audio" * 20, "not audio in a supported format"),
    (wav_bytes(tone(1.0, 16000), 16000)[:44 + 8000], "truncated: 8000 of 32000 bytes"),
    (wav_bytes(tone(1.0, 16000), 16000)[:40], "truncated"),
    (wav_bytes(tone(1.0, 16000), 16000, "FLAC")[:3000], "not audio in a supported format"),
])
def test_bad_audio_names_the_problem(data, words):
    with pytest.raises(AudioError, match=words):
        decode_audio(data, 16000)


def test_wav_written_to_a_pipe_has_no_size_and_is_read_whole():
    data = bytearray(wav_bytes(tone(0.25, 16000), 16000))
    pos = data.index(b"data")
    data[pos + 4:pos + 8] = struct.pack("<I", 0xFFFFFFFF)
    assert decode_audio(bytes(data), 16000).shape == (4000,)


def test_split_windows_covers_the_audio_in_30_second_steps():
    windows = split_windows(np.zeros(65 * 100, dtype=np.float32), 100)
    assert [(w.start, w.end, len(w.samples)) for w in windows] == [(0, 30, 3000), (30, 60, 3000), (60, 65, 500)]
    assert split_windows(np.zeros(0, dtype=np.float32), 100) == []


TS = 1000  # the first timestamp token id in these tests; time = (id - TS) * 0.02


def test_split_segments_by_timestamp_pairs_with_window_offset():
    tokens = [TS + 0, 5, 6, TS + 50, TS + 50, 7, TS + 100]
    segments = transcript.split_segments(tokens, [-0.1] * len(tokens), TS, 0.02, 30.0, 60.0)
    assert [(s.start, s.end, s.token_ids) for s in segments] == [(30.0, 31.0, (5, 6)), (31.0, 32.0, (7,))]
    assert segments[0].logprobs == (-0.1, -0.1)


def test_split_segments_without_timestamps_is_the_whole_window():
    segments = transcript.split_segments([5, 6, 7], [-1.0, -2.0, -3.0], TS, 0.02, 60.0, 65.0)
    assert [(s.start, s.end, s.token_ids) for s in segments] == [(60.0, 65.0, (5, 6, 7))]
    assert transcript.avg_logprob(segments[0]) == -2.0


def test_split_segments_open_ended_and_clamped_to_the_window():
    tokens = [TS + 10, 5, TS + 1400, TS + 1400, 6]  # 28 s into a window that is 5 s long
    segments = transcript.split_segments(tokens, [0.0] * 5, TS, 0.02, 0.0, 5.0)
    assert [(s.start, s.end, s.token_ids) for s in segments] == [(0.2, 5.0, (5,)), (5.0, 5.0, (6,))]
    assert transcript.split_segments([TS, TS + 5], [0.0, 0.0], TS, 0.02, 0.0, 30.0) == []


def test_srt_and_vtt_rendering():
    cues = [(0.0, 1.5, " Hello."), (3661.25, 3662.0, "World ")]
    assert transcript.render_srt(cues) == (
        "1\n00:00:00,000 --> 00:00:01,500\nHello.\n\n2\n01:01:01,250 --> 01:01:02,000\nWorld\n")
    assert transcript.render_vtt(cues) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.500\nHello.\n\n01:01:01.250 --> 01:01:02.000\nWorld\n")


def test_join_and_compression_ratio():
    assert transcript.join_texts([" Hello", "", " world. "]) == "Hello world."
    assert transcript.compression_ratio("") == 0.0
    assert transcript.compression_ratio("ab" * 200) > 2.4 > transcript.compression_ratio("The quick brown fox.")


def test_streamed_text_shows_finished_windows_in_order_then_the_first_open_one():
    decode = {(1,): " one", (2,): " two", (3,): " three", (): ""}.get
    def text(windows, finished):
        return transcript.streamed_text(windows, finished, lambda ids: decode(tuple(ids)))
    assert text([[1], [2], [3]], [False, True, True]) == "one"  # window 2 is done but waits for window 1
    assert text([[1], [2], [3]], [True, False, False]) == "one two"
    assert text([[1], [2], []], [True, True, False]) == "one two"


def test_stream_delta_waits_for_whole_characters_and_never_retracts():
    assert transcript.stream_delta("", "Hel") == "Hel"
    assert transcript.stream_delta("Hel", "Hello") == "lo"
    assert transcript.stream_delta("Hello", "Hello \ufffd") == ""
    assert transcript.stream_delta("Hello", "Help") == ""


def test_streamed_transcript_sends_each_window_in_turn_and_the_rest_at_the_end():
    words = {1: " one", 2: " two", 3: " thr", 4: "ee"}
    streamed = transcript.StreamedTranscript(2, frozenset({0}), lambda ids: "".join(words[i] for i in ids))
    assert streamed.add(1, 2) == ""  # the second window waits for the first
    assert [streamed.add(0, 1), streamed.add(0, 0)] == ["one", " two"]  # the end of window 0 lets window 1 show
    assert streamed.add(0, 3) == ""  # a finished window's padding is ignored
    assert streamed.add(1, 3) == " thr"
    assert streamed.rest("one two three") == "ee" and streamed.rest("something else") == ""


def _job(windows: int, options: DecodeOptions = DecodeOptions()) -> TranscribeJob:
    sink, _ = anyio.create_memory_object_stream(1)
    return TranscribeJob("id", np.zeros((windows, 80, 3000), dtype=np.float32), None, options, sink)


def test_take_waiting_drains_while_the_windows_fit_and_groups_by_options():
    send, receive = anyio.create_memory_object_stream(10)
    timed = DecodeOptions(timestamps=True)
    waiting = [_job(2), _job(1, timed), _job(3), _job(1)]
    for job in waiting:
        send.send_nowait(job)
    first = _job(1)
    taken = take_waiting(first, receive, 6, lambda job: len(job.features))
    assert taken == [first, *waiting[:3]]  # 1 + 2 + 1 + 3 windows: the batch is full after the fourth
    assert receive.receive_nowait() is waiting[3]
    assert group_by_options(taken) == [[first, waiting[0], waiting[2]], [waiting[1]]]


# The form of POST /v1/audio/transcriptions, read into TranscriptionRequest.

def _form(*pairs: tuple[str, str]):
    from werkzeug.datastructures import MultiDict

    from transerve.http.protocol.transcriptions import TranscriptionRequest

    return TranscriptionRequest.from_form(MultiDict(pairs), b"audio")


def test_form_fields_in_every_spelling_clients_use():
    body = _form(("model", "tiny/whisper"), ("temperature", "0.4"), ("stream", "true"), ("language", "en"),
                 ("prompt", ""), ("timestamp_granularities[]", "segment"), ("chunking_strategy[type]", "server_vad"),
                 ("chunking_strategy[threshold]", "0.5"))
    assert (body.model, body.temperature, body.stream, body.language, body.prompt) == ("tiny/whisper", 0.4, True, "en", None)
    assert body.timestamp_granularities == ["segment"] and body.chunking_strategy.threshold == 0.5
    assert body.file == b"audio" and body.decode_options() == DecodeOptions(None, 0.4, timestamps=False)
    # curl's: a plain key once or repeated, an object as one JSON part, a string strategy
    assert _form(("timestamp_granularities", "segment")).timestamp_granularities == ["segment"]
    assert _form(("timestamp_granularities", "segment"), ("timestamp_granularities", "segment")).timestamp_granularities == ["segment"] * 2
    assert _form(("chunking_strategy", '{"type": "server_vad", "prefix_padding_ms": 300}')).chunking_strategy.prefix_padding_ms == 300
    assert _form(("chunking_strategy", "auto")).chunking_strategy == "auto"
    verbose = _form(("response_format", "verbose_json"), ("stream", "false"))
    assert verbose.decode_options().timestamps and not verbose.stream
    assert _form().response_format == "json" and _form().temperature == 0.0


@pytest.mark.parametrize("pairs, param, code, words", [
    ([("diarize", "true")], "diarize", "unsupported_parameter", "unknown field 'diarize'"),
    ([("include[]", "logprobs")], "include", "unsupported_parameter", "no token logprobs"),
    ([("known_speaker_names[]", "agent")], "known_speaker_names", "unsupported_parameter", "no speaker diarization"),
    ([("response_format", "diarized_json")], "response_format", None, "got 'diarized_json'"),
    ([("temperature", "1.5")], "temperature", None, "less than or equal to 1"),
    ([("temperature", "warm")], "temperature", None, "valid number"),
    ([("stream", "maybe")], "stream", None, "valid boolean"),
    ([("stream", "true"), ("response_format", "srt")], "stream", None, "json or text"),
    ([("timestamp_granularities[]", "word")], "timestamp_granularities[0]", None, "'segment'"),
    ([("chunking_strategy[type]", "semantic")], "chunking_strategy.type", None, "'server_vad'"),
    ([("model", "a"), ("model", "b")], "model", None, "valid string"),
])
def test_a_bad_form_field_is_a_400_naming_it(pairs, param, code, words):
    from transerve.http.errors import OpenAIError

    with pytest.raises(OpenAIError) as info:
        _form(*pairs)
    error = info.value
    assert (error.status_code, error.param, error.code) == (400, param, code) and words in error.message, error.message
