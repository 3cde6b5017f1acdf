"""Whisper-family speech recognition: loading, and one batched decode of many 30 s windows.

The paged text engine does not run encoder-decoder models; a Whisper model is served by the
transcriber actor instead, which calls `decode_windows` in a worker thread with every window that
is waiting. Windows are independent (each is exactly 30 s of log-mel features), so one batched
`generate` gives each window what a `generate` of it alone would.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transerve.config import EngineConfig

SPEECH_ARCHITECTURES = frozenset({"WhisperForConditionalGeneration"})
TIME_PRECISION = 0.02  # seconds per timestamp token: 30 s over the encoder's 1500 positions


@dataclass(frozen=True)
class DecodeOptions:
    """What one generate call shares; requests that differ in these are decoded in separate calls."""

    prompt: str | None = None  # earlier text, to carry spelling and style over
    temperature: float = 0.0  # 0: greedy
    timestamps: bool = False  # segment times inside each window (verbose_json, srt, vtt)
    task: str = "transcribe"  # Whisper's task token: "transcribe", or "translate" (into English)


@dataclass(frozen=True)
class WindowResult:
    token_ids: tuple[int, ...]  # what the decoder wrote after its prompt, end of text excluded
    logprobs: tuple[float, ...]  # one per token of token_ids
    language: str  # the code given, or the one the model detected
    no_speech_prob: float  # the model's probability of <|nospeech|> at the start of transcript


@dataclass(frozen=True)
class Transcriber:
    """A loaded Whisper model and its processor."""

    model_id: str
    model: Any
    processor: Any
    sampling_rate: int
    device: torch.device
    dtype: torch.dtype
    multilingual: bool
    language_ids: tuple[tuple[str, int], ...]  # ("en", token id), ...: what `language` may name
    timestamp_begin: int
    no_speech_id: int | None
    max_windows: int  # most windows decoded in one call


def is_speech_to_text(path: str) -> bool:
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(SPEECH_ARCHITECTURES.intersection(config.get("architectures") or ()))


def load_transcriber(model_id: str, path: str, config: EngineConfig, device: torch.device, dtype: torch.dtype) -> Transcriber:
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

    processor = AutoProcessor.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    model = AutoModelForSpeechSeq2Seq.from_pretrained(path, dtype=dtype, trust_remote_code=config.trust_remote_code)
    model = model.to(device).eval()
    generation = model.generation_config
    lang_to_id = getattr(generation, "lang_to_id", None) or {}
    tokenizer = processor.tokenizer
    no_speech = [tokenizer.convert_tokens_to_ids(t) for t in ("<|nospeech|>", "<|nocaptions|>") if t in tokenizer.get_vocab()]
    return Transcriber(
        model_id=model_id, model=model, processor=processor, sampling_rate=processor.feature_extractor.sampling_rate,
        device=device, dtype=dtype, multilingual=bool(getattr(generation, "is_multilingual", False)),
        language_ids=tuple((token.strip("<|>"), i) for token, i in lang_to_id.items()),
        timestamp_begin=generation.no_timestamps_token_id + 1, no_speech_id=no_speech[0] if no_speech else None,
        max_windows=config.scheduler.max_num_seqs,
    )


def log_mel_features(t: Transcriber, windows: Sequence[np.ndarray]) -> np.ndarray:
    """[windows, mel bins, 3000] float32: each window padded to 30 s, as Whisper was trained."""
    return t.processor.feature_extractor(list(windows), sampling_rate=t.sampling_rate, return_tensors="np").input_features


class DecodeRecorder:
    """Both a logits processor and a streamer for `generate`: the processor sees each step's final
    scores, the streamer the tokens chosen from them, so together they give each token's logprob.
    `on_tokens(row, token_id)` hears every new token as it is chosen (for streamed responses)."""

    def __init__(self, batch_size: int, on_token: Callable[[int, int], None] | None) -> None:
        self.logprobs: list[list[float]] = [[] for _ in range(batch_size)]
        self.on_token = on_token
        self.prompt_length = 0
        self._last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._last = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def put(self, value: torch.Tensor) -> None:
        if value.dim() > 1:  # the decoder prompt, sent once before the first step
            self.prompt_length = value.shape[-1]
            return
        chosen = self._last.gather(1, value.view(-1, 1).to(self._last.device)).view(-1).tolist()
        for row, (token, logprob) in enumerate(zip(value.tolist(), chosen)):
            self.logprobs[row].append(logprob)
            if self.on_token is not None:
                self.on_token(row, token)

    def end(self) -> None:
        pass


def decode_windows(t: Transcriber, features: np.ndarray, languages: Sequence[str | None], options: DecodeOptions,
                   on_token: Callable[[int, int], None] | None = None) -> list[WindowResult]:
    """One batched generate over `features` ([windows, mel bins, frames]); `languages[i]` is the
    language of window i, or None to detect it. Raises ValueError for options the model refuses."""
    from transformers import LogitsProcessorList
    from transformers.modeling_outputs import BaseModelOutput

    model, batch = t.model, features.shape[0]
    x = torch.from_numpy(features).to(t.device, t.dtype)
    with torch.inference_mode():
        # The encoder runs once: its output serves the start-of-transcript step (language and
        # no-speech probabilities, as Whisper computes them) and then generate.
        encoded = model.get_encoder()(x).last_hidden_state
        start = torch.full((batch, 1), model.generation_config.decoder_start_token_id, device=t.device)
        first = model(encoder_outputs=(encoded,), decoder_input_ids=start).logits[:, -1].float().softmax(-1)
        no_speech = first[:, t.no_speech_id].tolist() if t.no_speech_id is not None else [0.0] * batch
        kwargs: dict[str, Any] = {}
        if t.multilingual:
            codes, ids = zip(*t.language_ids)
            detected = [codes[i] for i in first[:, list(ids)].argmax(-1).tolist()]
            languages = [given or found for given, found in zip(languages, detected)]
            kwargs.update(language=list(languages), task=options.task)
        else:
            languages = ["en"] * batch  # English-only checkpoints (*.en) take no language
        if options.prompt:
            kwargs["prompt_ids"] = t.processor.get_prompt_ids(options.prompt, return_tensors="pt").to(t.device)
        if options.temperature > 0:
            kwargs.update(do_sample=True, temperature=options.temperature)
        else:
            kwargs.update(do_sample=False)
        recorder = DecodeRecorder(batch, on_token)
        # One generate pass per window (as the ASR pipeline does for chunks): without it, Whisper
        # seeks inside the window and decodes again after the last complete segment.
        out = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=encoded), return_timestamps=options.timestamps,
                             force_unique_generate_call=True, logits_processor=LogitsProcessorList([recorder]),
                             streamer=recorder, **kwargs)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos) if isinstance(eos, list) else {eos}
    results = []
    for row, ids in enumerate(out[:, recorder.prompt_length:].tolist()):  # the decoder prompt comes first
        ids = ids[:next((i for i, token in enumerate(ids) if token in eos_ids), len(ids))]
        results.append(WindowResult(tuple(ids), tuple(recorder.logprobs[row][:len(ids)]), languages[row], no_speech[row]))
    return results
