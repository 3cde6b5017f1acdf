"""POST /v1/audio/translations: Whisper's translate task, through the openai SDK's
`client.audio.translations.create` (bodies validated against the SDK's Translation types). A tiny random
Whisper translates nothing meaningfully, so the checks are what a user can see of the task: the text
equals the model's own `generate(task="translate")`, the decoder prompt holds <|translate|>, and the
formats and errors are the transcriptions'."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from audio_helpers import WHISPER_REPO, read_mono_16k, reference_transcripts
from openai_server import checked
from test_audio_server import client, server, speech, whisper_repo, whisper_tokenizer, windows_of  # noqa: F401 (fixtures)


def test_translation_equals_generate_with_the_translate_task(client, whisper_repo, whisper_tokenizer, speech):
    windows = windows_of(read_mono_16k(speech))
    # No language given: the server detects it per window, as generate does.
    ids = reference_transcripts(whisper_repo, windows, task="translate")
    expected = " ".join(t for t in (whisper_tokenizer.decode(i, skip_special_tokens=True).strip() for i in ids) if t)
    assert expected
    with open(speech, "rb") as f:
        assert client.audio.translations.create(model=WHISPER_REPO, file=f).text == expected
    with open(speech, "rb") as f:
        assert client.audio.translations.create(model=WHISPER_REPO, file=f, response_format="text").strip() == expected


def test_translation_formats(server, client, speech):
    with open(speech, "rb") as f:
        verbose = client.audio.translations.create(model=WHISPER_REPO, file=f, response_format="verbose_json",
                                                   prompt="A fox.", temperature=0.0)
    assert verbose.language == "english" and verbose.duration > 0 and verbose.segments
    assert verbose.text == " ".join(s.text for s in verbose.segments)
    raw = checked(httpx.post(server.base_url + "/v1/audio/translations", timeout=120, files={"file": ("a.wav", speech.read_bytes())},
                             data={"model": WHISPER_REPO, "response_format": "verbose_json"}))
    assert raw.json()["task"] == "translate"
    with open(speech, "rb") as f:
        srt = client.audio.translations.create(model=WHISPER_REPO, file=f, response_format="srt")
    with open(speech, "rb") as f:
        vtt = client.audio.translations.create(model=WHISPER_REPO, file=f, response_format="vtt")
    assert srt.startswith("1\n00:00:") and vtt.startswith("WEBVTT\n\n")
    assert srt.count(" --> ") == vtt.count(" --> ") == len(verbose.segments)


def test_translation_errors_are_the_transcriptions(server, client, speech):
    url = server.base_url + "/v1/audio/translations"
    wav = speech.read_bytes()
    for data, files, param in [
        ({"language": "fr"}, {"file": ("a.wav", wav)}, "language"),  # OpenAI's translations take no language
        ({"stream": "true"}, {"file": ("a.wav", wav)}, "stream"),
        ({"temperature": "2"}, {"file": ("a.wav", wav)}, "temperature"),
        ({}, {"file": ("a.wav", b"not audio at all" * 10)}, "file"),
    ]:
        response = checked(httpx.post(url, data={"model": WHISPER_REPO, **data}, files=files, timeout=60))
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text
    with pytest.raises(openai.BadRequestError, match="cannot transcribe audio"):
        client.audio.translations.create(model="tiny/llama", file=("a.wav", wav))


def test_translate_puts_the_translate_token_in_the_decoder_prompt(whisper_repo, whisper_tokenizer, speech):
    from transerve.config import EngineConfig
    from transerve.engine.whisper import DecodeOptions, decode_windows, load_transcriber, log_mel_features

    t = load_transcriber(WHISPER_REPO, str(whisper_repo), EngineConfig(), torch.device("cpu"), torch.float32)
    outputs = []
    generate = t.model.generate

    def recording_generate(*args, **kwargs):  # generate returns the decoder prompt before the text
        outputs.append(generate(*args, **kwargs))
        return outputs[-1]

    t.model.generate = recording_generate
    features = log_mel_features(t, [read_mono_16k(speech)])
    for task in ("translate", "transcribe"):
        decode_windows(t, features, ["fr"], DecodeOptions(task=task))
    prompts = [whisper_tokenizer.convert_ids_to_tokens(out[0, :4].tolist()) for out in outputs]
    assert prompts == [["<|startoftranscript|>", "<|fr|>", f"<|{task}|>", "<|notimestamps|>"]
                       for task in ("translate", "transcribe")]
