"""POST /v1/audio/transcriptions on a live server with a tiny random Whisper, through the openai SDK
(every body read is validated against the openai package's own types: Transcription, TranscriptionVerbose,
the transcript.text.* stream events, errors).

Answers are checked against the tiny model's own `generate` on the same audio (loaded with the same
soundfile + soxr path), decoded by its own tokenizer; timed segments against the tokenizer's own
`decode(..., output_offsets=True)`.
"""

from __future__ import annotations

import concurrent.futures
import re

import httpx
import numpy as np
import openai
import pytest
import soundfile

from audio_helpers import WHISPER_REPO, build_tiny_whisper, read_mono_16k, reference_transcripts, speak
from conftest import LiveServer
from openai_server import checked, sdk_client

SENTENCE = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def whisper_repo(tmp_path_factory):
    return build_tiny_whisper(tmp_path_factory.mktemp("whisper"))


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    return speak(SENTENCE, tmp_path_factory.mktemp("speech") / "speech.wav")


@pytest.fixture(scope="module")
def server(whisper_repo, tiny_repos):
    srv = LiveServer("--no-preload")
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture()
def client(server):
    return sdk_client(server.base_url, timeout=300)


@pytest.fixture(scope="module")
def whisper_tokenizer(whisper_repo):
    from transformers import WhisperTokenizer

    return WhisperTokenizer.from_pretrained(whisper_repo)


def windows_of(samples: np.ndarray) -> list[np.ndarray]:
    return [samples[i:i + 480000] for i in range(0, len(samples), 480000)]


def expected_text(whisper_repo, tokenizer, samples: np.ndarray, **kwargs) -> str:
    windows = windows_of(samples)
    ids = reference_transcripts(whisper_repo, windows, language=["en"] * len(windows), task="transcribe", **kwargs)
    return " ".join(t for t in (tokenizer.decode(i, skip_special_tokens=True).strip() for i in ids) if t)


def expected_segments(whisper_repo, tokenizer, samples: np.ndarray) -> list[tuple[float, float, str]]:
    windows = windows_of(samples)
    ids = reference_transcripts(whisper_repo, windows, language=["en"] * len(windows), task="transcribe",
                                return_timestamps=True)
    timestamp_begin = tokenizer.convert_tokens_to_ids("<|0.00|>")
    out = []
    for w, (window, row) in enumerate(zip(windows, ids)):
        end = w * 30 + len(window) / 16000
        for offset in tokenizer.decode(row, output_offsets=True)["offsets"]:
            start, stop = offset["timestamp"]
            if offset["text"].strip():
                out.append((min(w * 30 + start, end), min(w * 30 + stop, end), offset["text"].strip()))
        # Text after the last timestamp (decoding hit its limit) is a segment to the window's end, as in
        # openai/whisper; the tokenizer's offsets leave it out.
        last = max(i for i, token in enumerate(row) if token >= timestamp_begin)
        tail = tokenizer.decode(row[last + 1:], skip_special_tokens=True).strip()
        if tail:
            out.append((min(w * 30 + (row[last] - timestamp_begin) * 0.02, end), end, tail))
    return out


def test_json_and_text_equal_generate(client, whisper_repo, whisper_tokenizer, speech):
    expected = expected_text(whisper_repo, whisper_tokenizer, read_mono_16k(speech))
    assert expected  # random weights still write something
    with open(speech, "rb") as f:
        reply = client.audio.transcriptions.create(model=WHISPER_REPO, file=f, language="en")
    assert reply.text == expected
    assert reply.usage.type == "duration" and abs(reply.usage.seconds - len(read_mono_16k(speech)) / 16000) < 0.01
    with open(speech, "rb") as f:
        text = client.audio.transcriptions.create(model=WHISPER_REPO, file=f, language="en", response_format="text")
    assert text.strip() == expected


def test_verbose_json_srt_vtt_segments_equal_generate(client, whisper_repo, whisper_tokenizer, speech):
    samples = read_mono_16k(speech)
    segments = expected_segments(whisper_repo, whisper_tokenizer, samples)
    assert segments
    with open(speech, "rb") as f:
        verbose = client.audio.transcriptions.create(model=WHISPER_REPO, file=f, language="en",
                                                     response_format="verbose_json", timestamp_granularities=["segment"])
    assert verbose.language == "english" and abs(verbose.duration - len(samples) / 16000) < 0.01
    assert [s.text for s in verbose.segments] == [s[2] for s in segments]
    assert [t for s in verbose.segments for t in (s.start, s.end)] == pytest.approx([t for s in segments for t in s[:2]], abs=0.006)
    assert verbose.text == " ".join(s[2] for s in segments)
    for i, s in enumerate(verbose.segments):
        assert s.id == i and s.seek == 0 and s.temperature == 0.0 and s.tokens
        assert s.avg_logprob < 0 and 0 <= s.no_speech_prob <= 1 and s.compression_ratio > 0
    with open(speech, "rb") as f:
        srt = client.audio.transcriptions.create(model=WHISPER_REPO, file=f, language="en", response_format="srt")
    with open(speech, "rb") as f:
        vtt = client.audio.transcriptions.create(model=WHISPER_REPO, file=f, language="en", response_format="vtt")
    srt_cues = re.findall(r"(\d+)\n(\d\d:\d\d:\d\d,\d{3}) --> (\d\d:\d\d:\d\d,\d{3})\n(.*)\n", srt)
    assert [c[3] for c in srt_cues] == [s[2] for s in segments]
    assert [c[0] for c in srt_cues] == [str(i + 1) for i in range(len(segments))]
    assert vtt.startswith("WEBVTT\n\n")
    vtt_cues = re.findall(r"(\d\d:\d\d:\d\d\.\d{3}) --> (\d\d:\d\d:\d\d\.\d{3})\n(.*)\n", vtt)
    assert [c[2] for c in vtt_cues] == [s[2] for s in segments]
    assert [c[:2] for c in vtt_cues] == [(c[1].replace(",", "."), c[2].replace(",", ".")) for c in srt_cues]
    assert [float(c[1][-6:].replace(",", ".")) for c in srt_cues] == pytest.approx([s[0] for s in segments], abs=0.0006)


def test_flac_and_ogg(client, whisper_repo, whisper_tokenizer, speech, tmp_path):
    samples, rate = soundfile.read(str(speech), dtype="float32")
    with open(speech, "rb") as f:
        from_wav = client.audio.transcriptions.create(model=WHISPER_REPO, file=f, language="en").text
    for fmt in ("flac", "ogg"):
        path = tmp_path / f"speech.{fmt}"
        soundfile.write(str(path), samples, rate, format=fmt.upper())
        with open(path, "rb") as f:
            reply = client.audio.transcriptions.create(model=WHISPER_REPO, file=f, language="en")
        assert reply.text == expected_text(whisper_repo, whisper_tokenizer, read_mono_16k(path))
        if fmt == "flac":  # lossless: the very same samples
            assert reply.text == from_wav


def test_long_audio_is_transcribed_in_30_second_windows(client, whisper_repo, whisper_tokenizer, speech, tmp_path):
    voice, rate = soundfile.read(str(speech), dtype="float32")
    rng = np.random.default_rng(0)
    parts = [voice if i % 2 == 0 else 0.01 * rng.standard_normal(rate * 9).astype(np.float32) for i in range(13)]
    path = tmp_path / "long.wav"
    soundfile.write(str(path), np.concatenate(parts), rate)
    samples = read_mono_16k(path)
    assert len(samples) > 60 * 16000  # three windows
    with open(path, "rb") as f:
        reply = client.audio.transcriptions.create(model=WHISPER_REPO, file=f, language="en")
    assert reply.text == expected_text(whisper_repo, whisper_tokenizer, samples)
    with open(path, "rb") as f:
        verbose = client.audio.transcriptions.create(model=WHISPER_REPO, file=f, language="en", response_format="verbose_json")
    segments = expected_segments(whisper_repo, whisper_tokenizer, samples)
    assert [s.text for s in verbose.segments] == [s[2] for s in segments]
    assert [t for s in verbose.segments for t in (s.start, s.end)] == pytest.approx([t for s in segments for t in s[:2]], abs=0.006)
    assert {s.seek for s in verbose.segments} == {0, 3000, 6000}
    assert verbose.segments[-1].end <= verbose.duration


def test_stream_sends_deltas_then_done(client, speech):
    with open(speech, "rb") as f:
        whole = client.audio.transcriptions.create(model=WHISPER_REPO, file=f, language="en").text
    with open(speech, "rb") as f:
        events = list(client.audio.transcriptions.create(model=WHISPER_REPO, file=f, language="en", stream=True))
    deltas = [e for e in events if e.type == "transcript.text.delta"]
    assert events[-1].type == "transcript.text.done" and len(events) == len(deltas) + 1
    assert len(deltas) > 1  # token by token, not one block at the end
    assert "".join(d.delta for d in deltas) == events[-1].text == whole
    assert events[-1].usage.output_tokens > 0


def _batch_counts(server) -> tuple[float, float]:
    """(batches that held one request, all batches) of tiny/whisper, from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    singles = total = 0.0
    for family in text_string_to_metric_families(httpx.get(server.base_url + "/metrics").text):
        for sample in family.samples:
            if sample.labels.get("model") != WHISPER_REPO:
                continue
            if sample.name == "transerve_transcription_batch_requests_bucket" and sample.labels["le"] == "1.0":
                singles = sample.value
            if sample.name == "transerve_transcription_batch_requests_count":
                total = sample.value
    return singles, total


def test_concurrent_requests_are_batched(server, client, speech):
    singles_before, batches_before = _batch_counts(server)
    with open(speech, "rb") as f:
        audio = f.read()
    def one(i: int) -> str:
        return client.audio.transcriptions.create(model=WHISPER_REPO, file=("speech.wav", audio), language="en").text
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(8)))
    assert len(set(texts)) == 1
    singles, batches = _batch_counts(server)
    assert batches - batches_before < 8  # fewer decodes than requests: some ran together
    assert (batches - batches_before) - (singles - singles_before) >= 1  # at least one batch held several


def test_bad_media_gets_400_and_the_server_keeps_serving(server, client, speech):
    wav = speech.read_bytes()
    url = server.base_url + "/v1/audio/transcriptions"
    cases = [
        ({"file": ("a.wav", b"this is not audio at all" * 10)}, "not audio in a supported format"),
        ({"file": ("a.wav", wav[:len(wav) // 2])}, "truncated"),
        ({"file": ("a.wav", b"")}, "empty"),
        ({"file": ("big.wav", b"\0" * (25 * 1024 * 1024 + 1))}, "larger than the limit"),
        ({}, "`file` field is missing"),
    ]
    for files, words in cases:
        response = checked(httpx.post(url, data={"model": WHISPER_REPO}, files=files or {"other": ("x", b"x")}, timeout=60))
        assert response.status_code == 400, (words, response.text)
        error = response.json()["error"]
        assert words in error["message"] and error["type"] == "invalid_request_error" and error["param"] == "file"
    bad_language = checked(httpx.post(url, data={"model": WHISPER_REPO, "language": "xx"}, files={"file": ("a.wav", wav)},
                                      timeout=60))
    assert bad_language.status_code == 400 and bad_language.json()["error"]["param"] == "language"
    with pytest.raises(openai.BadRequestError, match="not audio"):
        client.audio.transcriptions.create(model=WHISPER_REPO, file=("a.ogg", b"OggS" + b"\0" * 100))
    with open(speech, "rb") as f:
        assert client.audio.transcriptions.create(model=WHISPER_REPO, file=f, language="en").text


def test_form_fields_as_the_sdk_and_curl_send_them_and_bad_ones_named(server, client, speech):
    wav = speech.read_bytes()
    with open(speech, "rb") as f:  # the SDK writes lists as `key[]` and objects as `key[sub]`
        verbose = client.audio.transcriptions.create(
            model=WHISPER_REPO, file=f, language="en", temperature=0.0, response_format="verbose_json",
            timestamp_granularities=["segment"], chunking_strategy={"type": "server_vad", "threshold": 0.5})
    assert verbose.segments and verbose.duration > 0
    url = server.base_url + "/v1/audio/transcriptions"
    plain = checked(httpx.post(url, data={"model": WHISPER_REPO, "language": "en", "stream": "false", "temperature": "0",
                                          "chunking_strategy": "auto"}, files={"file": ("a.wav", wav)}, timeout=60))
    assert plain.status_code == 200 and plain.json()["text"]
    for data, files, param, code in [
        ({"stream": "true", "response_format": "vtt"}, {}, "stream", None),
        ({"temperature": "2"}, {}, "temperature", None),
        ({"include[]": "logprobs"}, {}, "include", "unsupported_parameter"),
        ({"diarize": "true"}, {}, "diarize", "unsupported_parameter"),
        ({}, {"prompt": ("notes.txt", b"Fox.")}, "prompt", "unsupported_parameter"),  # a field sent as a file
    ]:
        response = checked(httpx.post(url, data={"model": WHISPER_REPO, **data}, files={"file": ("a.wav", wav), **files},
                                      timeout=60))
        assert response.status_code == 400, (data, response.text)
        assert (response.json()["error"]["param"], response.json()["error"]["code"]) == (param, code), response.text


def test_models_of_the_other_kind_get_400(client, speech):
    with open(speech, "rb") as f, pytest.raises(openai.BadRequestError, match="cannot transcribe audio"):
        client.audio.transcriptions.create(model="tiny/llama", file=f)
    with pytest.raises(openai.BadRequestError, match="/v1/audio/transcriptions"):
        client.chat.completions.create(model=WHISPER_REPO, messages=[{"role": "user", "content": "hi"}])


def test_models_and_metrics_with_whisper_loaded(server, client, speech):
    with open(speech, "rb") as f:
        client.audio.transcriptions.create(model=WHISPER_REPO, file=f, language="en")
    listed = {m.id: m for m in client.models.list().data}
    assert WHISPER_REPO in listed and listed[WHISPER_REPO].model_extra["loaded"] is True
    metrics = httpx.get(server.base_url + "/metrics")
    assert metrics.status_code == 200
    assert f'transerve_transcription_batch_windows_count{{model="{WHISPER_REPO}"}}' in metrics.text
    assert 'endpoint="/v1/audio/transcriptions"' in metrics.text
