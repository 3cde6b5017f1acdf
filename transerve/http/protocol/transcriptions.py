"""POST /v1/audio/transcriptions: a multipart form, read into the same kind of model as the JSON bodies.

A form carries only text, so its values are read the way pydantic reads strings (`true`, `0.5`); a
repeated key, or one written `key[]` as the openai SDK does, is a list; `key[sub]` (the SDK's spelling
of an object) or a part holding a JSON object is an object; an empty value is absent. The audio comes
in the `file` part, which the handler reads (it enforces the size limit) and hands in as bytes.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, ValidationError, model_validator

from transerve.engine.whisper import DecodeOptions
from transerve.http.protocol.base import (FORM, HONOURED, IGNORED, PARTLY, Part, RequestBody, invalid, openai_error, rejected,
                                          spec)

MAX_AUDIO_BYTES = 25 * 1024 * 1024  # OpenAI's own limit for one file
Format = Literal["json", "text", "verbose_json", "srt", "vtt"]
TIMED_FORMATS = frozenset({"verbose_json", "srt", "vtt"})  # these ask Whisper for timestamps
_NESTED = re.compile(r"^(\w+)\[(\w*)\]$")  # `include[]`, `chunking_strategy[type]`


def _one_or_many(value: Any) -> Any:
    """A list field given once in a form is a one-item list."""
    return [value] if isinstance(value, str) else value


def _json_object(value: Any) -> Any:
    """An object field sent as one part holding JSON (OpenAPI's default encoding of an object in a form)."""
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            return json.loads(value)
        except ValueError:
            pass  # left as text: the field then says it wants an object
    return value


class ServerVad(Part):
    type: Literal["server_vad"]
    prefix_padding_ms: int | None = spec(IGNORED, ge=0)
    silence_duration_ms: int | None = spec(IGNORED, ge=0)
    threshold: float | None = spec(IGNORED, ge=0, le=1)


class AudioRequest(RequestBody):
    """What a transcription and a translation share: the audio, how to decode it, and the form it comes in."""

    media_type: ClassVar[str] = FORM
    task: ClassVar[str]  # Whisper's task token

    file: bytes = spec(HONOURED, "WAV, FLAC, OGG/Vorbis, MP3 and whatever else libsndfile reads, up to 25 MiB; mixed "
                       "to mono and resampled to the model's rate", ...)
    model: str | None = spec(HONOURED, "a Whisper-family repo or repo@revision, loaded on first use; the pinned model "
                             "when the server has one")
    prompt: str | None = spec(HONOURED, "earlier text, to carry spelling and style over")
    response_format: Format = spec(PARTLY, "json, text, verbose_json (segments), srt, vtt; diarized_json needs speaker "
                                   "diarization: 400", "json")
    temperature: float = spec(HONOURED, "0 to 1; 0 is greedy", 0.0, ge=0, le=1)

    @classmethod
    def from_form(cls, form, audio: bytes) -> AudioRequest:
        """The form's fields (a MultiDict) and the audio, validated; any problem is a 400 naming the field."""
        data: dict[str, Any] = {}
        for key, value in form.items(multi=True):
            if value == "":
                continue
            nested = _NESTED.match(key)
            name, sub = nested.groups() if nested else (key, None)
            if sub == "" or (sub is None and name in data):  # `key[]`, or a key repeated
                held = data.get(name)
                data[name] = (held if isinstance(held, list) else [] if held is None else [held]) + [value]
            elif sub is not None:
                held = data.setdefault(name, {})
                data[name] = {**held, sub: value} if isinstance(held, dict) else [held, {sub: value}]
            else:
                data[name] = value
        data["file"] = audio
        try:
            return cls.model_validate_strings(data, strict=False)
        except ValidationError as exc:
            raise openai_error(exc, cls.endpoint) from None

    def decode_options(self) -> DecodeOptions:
        return DecodeOptions(self.prompt, self.temperature, timestamps=self.response_format in TIMED_FORMATS, task=self.task)

    def spoken_language(self) -> str | None:
        """The audio's language when the request names it; None: detected per window."""
        return None

    def streamed(self) -> bool:
        return False


class TranscriptionRequest(AudioRequest):
    endpoint: ClassVar[str] = "/v1/audio/transcriptions"
    task: ClassVar[str] = "transcribe"

    language: str | None = spec(HONOURED, "ISO-639-1 (e.g. `en`); detected per 30 s window when absent")
    stream: bool = spec(PARTLY, "`transcript.text.delta` events, then `transcript.text.done`; with json or text only "
                        "(timed formats come whole)", False)
    timestamp_granularities: Annotated[list[Literal["segment"]], BeforeValidator(_one_or_many)] | None = spec(
        PARTLY, "`segment` only (no word timestamps); also as `timestamp_granularities[]`")
    chunking_strategy: Annotated[Literal["auto"] | ServerVad, BeforeValidator(_json_object)] | None = spec(
        IGNORED, "the audio is cut into Whisper's 30 s windows whatever is asked (no voice activity detection)")
    include: Any = rejected("no token logprobs for transcriptions")
    keywords: Any = rejected("no keyword biasing: put the words in `prompt`")
    languages: Any = rejected("give one language in `language`, or none to have it detected")
    known_speaker_names: Any = rejected("no speaker diarization")
    known_speaker_references: Any = rejected("no speaker diarization")

    @model_validator(mode="after")
    def _combinations(self) -> TranscriptionRequest:
        if self.stream and self.response_format in TIMED_FORMATS:
            raise invalid("stream", "needs response_format json or text (timed formats come whole)")
        return self

    def spoken_language(self) -> str | None:
        return self.language

    def streamed(self) -> bool:
        return self.stream


class TranslationRequest(AudioRequest):
    """OpenAI's translations take no `language` (it is detected) and do not stream."""

    endpoint: ClassVar[str] = "/v1/audio/translations"
    task: ClassVar[str] = "translate"
