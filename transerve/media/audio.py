"""Audio files to model input: decode with soundfile, mix to mono, resample, cut into 30 s windows.

Pure, synchronous functions; the HTTP layer runs them in a worker thread. Every way a file can be
unusable raises `AudioError` with a message that names the problem, for a 400.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np

WINDOW_SECONDS = 30  # Whisper's encoder sees exactly 30 s; longer audio is transcribed window by window


class AudioError(ValueError):
    """The bytes are not audio we can use; the message says why."""


@dataclass(frozen=True)
class AudioWindow:
    start: float  # seconds from the start of the file
    end: float
    samples: np.ndarray  # mono float32 at the model's sampling rate


def decode_audio(data: bytes, sampling_rate: int) -> np.ndarray:
    """Mono float32 samples at `sampling_rate` from a WAV, FLAC, OGG, ... file's bytes."""
    import soundfile
    import soxr

    if not data:
        raise AudioError("the audio file is empty")
    check_wav_complete(data)
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            declared, rate, kind = f.frames, f.samplerate, f.format
            samples = f.read(dtype="float32", always_2d=True)
    except soundfile.LibsndfileError as exc:
        reason = str(exc).split(": ", 1)[-1].strip() or "unreadable"
        raise AudioError(f"the file is not audio in a supported format (WAV, FLAC, OGG, MP3, ...): {reason}") from exc
    if samples.shape[0] == 0:
        raise AudioError(f"the {kind} file holds no audio samples (truncated or empty)")
    if samples.shape[0] < declared:
        raise AudioError(f"the {kind} file is truncated: {samples.shape[0]} of {declared} frames present")
    if not np.isfinite(samples).all():
        raise AudioError(f"the {kind} file holds samples that are not finite numbers")
    mono = samples.mean(axis=1)  # mixing down keeps every channel's speech
    if rate != sampling_rate:
        mono = soxr.resample(mono, rate, sampling_rate)  # soxr's default high quality (HQ) setting
    return np.ascontiguousarray(mono, dtype=np.float32)


def check_wav_complete(data: bytes) -> None:
    """libsndfile reads a cut-off WAV without complaint (it trusts the bytes it has), so compare the
    data chunk's declared size with the bytes present. Sizes 0 and 0xFFFFFFFF mean 'unknown' (WAVs
    written to a pipe) and are not checked."""
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        return
    order = "<" if data[:4] == b"RIFF" else ">"
    pos = 12
    while pos + 8 <= len(data):
        chunk_id, size = data[pos:pos + 4], struct.unpack(order + "I", data[pos + 4:pos + 8])[0]
        if chunk_id == b"data":
            present = len(data) - pos - 8
            if size not in (0, 0xFFFFFFFF) and present < size:
                raise AudioError(f"the WAV file is truncated: {present} of {size} bytes of audio data present")
            return
        pos += 8 + size + (size & 1)  # chunks are padded to an even length
    raise AudioError("the WAV file is truncated: it has no audio data chunk")


def split_windows(samples: np.ndarray, sampling_rate: int, window_seconds: int = WINDOW_SECONDS) -> list[AudioWindow]:
    """Consecutive windows of at most `window_seconds`; the last one holds what is left."""
    step = window_seconds * sampling_rate
    return [AudioWindow(start / sampling_rate, min(start + step, len(samples)) / sampling_rate, samples[start:start + step])
            for start in range(0, len(samples), step)]
