"""A tiny random Whisper with a real WhisperProcessor, built offline, and speech spoken by espeak-ng.

The tokenizer is a byte-level BPE over the 256 byte symbols (no merges) followed by Whisper's special
tokens in Whisper's own order (end of text, start of transcript, the languages, the tasks, ...,
no-timestamps) and the 1501 timestamp tokens, so `generate(language=..., return_timestamps=...)` and
`decode(...)` take the same code paths as with openai/whisper-tiny.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import torch

from conftest import save_in_hf_cache

LANGUAGES = ("en", "fr", "de", "es")  # a real Whisper knows 99; four keep the tiny vocabulary small
WHISPER_REPO = "tiny/whisper"
MAX_NEW_TOKENS = 24  # the tiny model's own generation limit: random weights rarely say end-of-text early


def byte_level_vocab() -> dict[str, int]:
    from tokenizers import pre_tokenizers

    return {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}


def build_processor(work: Path):
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    tokenizer = WhisperTokenizer(vocab=byte_level_vocab(), merges=[])
    specials = ["<|startoftranscript|>", *(f"<|{code}|>" for code in LANGUAGES), "<|translate|>", "<|transcribe|>",
                "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.add_tokens([f"<|{i * 0.02:.2f}|>" for i in range(1501)])  # timestamps: after every special token
    processor = WhisperProcessor(WhisperFeatureExtractor(feature_size=80), tokenizer)
    processor.save_pretrained(work)
    return processor


def generation_config(tokenizer):
    from transformers import GenerationConfig

    ids = tokenizer.convert_tokens_to_ids
    return GenerationConfig(
        decoder_start_token_id=ids("<|startoftranscript|>"), eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
        max_new_tokens=MAX_NEW_TOKENS, is_multilingual=True,
        lang_to_id={f"<|{code}|>": ids(f"<|{code}|>") for code in LANGUAGES},
        task_to_id={"translate": ids("<|translate|>"), "transcribe": ids("<|transcribe|>")},
        no_timestamps_token_id=ids("<|notimestamps|>"), prev_sot_token_id=ids("<|startofprev|>"),
        max_initial_timestamp_index=50, begin_suppress_tokens=[tokenizer.eos_token_id], suppress_tokens=[],
    )


def build_tiny_whisper(work: Path, repo_id: str = WHISPER_REPO) -> Path:
    """Random weights, real processor and generation config, saved in the private HF cache."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    processor = build_processor(work)
    tokenizer = processor.tokenizer
    sot = tokenizer.convert_tokens_to_ids("<|startoftranscript|>")
    config = WhisperConfig(
        vocab_size=len(tokenizer), num_mel_bins=80, d_model=64, encoder_layers=1, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=1500, max_target_positions=448, decoder_start_token_id=sot,
        pad_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        architectures=["WhisperForConditionalGeneration"],
    )
    torch.manual_seed(0)
    model = WhisperForConditionalGeneration(config).eval()
    timestamp_begin = tokenizer.convert_tokens_to_ids("<|0.00|>")
    prompt_tokens = list(range(tokenizer.eos_token_id + 1, timestamp_begin))  # start of transcript ... no timestamps
    steer_away_from_timestamps(model, timestamp_begin, non_ascii_ids(tokenizer) + prompt_tokens)
    model.generation_config = generation_config(tokenizer)
    model.save_pretrained(work)
    return save_in_hf_cache(repo_id, work)


def non_ascii_ids(tokenizer) -> list[int]:
    """Byte tokens that are not printable ASCII: alone they decode to U+FFFD or control characters."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbol_to_byte = {symbol: byte for byte, symbol in bytes_to_unicode().items()}
    return [i for symbol, i in byte_level_vocab().items() if not 32 <= symbol_to_byte[symbol] < 127]


def steer_away_from_timestamps(model, timestamp_begin: int, also: list[int] = ()) -> None:
    """Random weights put most of the probability on the 1501 timestamp tokens, and a Whisper that
    writes timestamps unasked makes generate seek through the window many times. A trained Whisper
    writes them only when asked: here the decoder's last layer norm sets feature 0 to a constant 5
    and the timestamp embeddings (tied to the output projection) point against it, so each timestamp
    scores -2.5 (never the greedy choice; together still likely enough that Whisper's timestamp rules
    write them when asked) while text tokens ignore feature 0 and follow the audio. Tokens in
    `also` (bytes that are not printable ASCII, the decoder prompt's special tokens) score -7, so texts
    are readable."""
    with torch.no_grad():
        model.model.decoder.layer_norm.weight[0] = 0.0  # feature 0 is the constant alone, whatever the input
        model.model.decoder.layer_norm.bias[0] = 5.0
        embeddings = model.model.decoder.embed_tokens.weight
        embeddings[:, 0] = 0.0
        embeddings[timestamp_begin:] = 0.0
        embeddings[timestamp_begin:, 0] = -0.5
        embeddings[list(also), 0] = -1.4


def speak(text: str, path: Path) -> Path:
    """A WAV of `text` spoken by espeak-ng (22.05 kHz mono)."""
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
    return path


def read_mono_16k(path: Path) -> np.ndarray:
    """The reference's own audio path: soundfile, mean over channels, soxr to 16 kHz."""
    import soundfile
    import soxr

    samples, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    return soxr.resample(samples.mean(axis=1), rate, 16000).astype(np.float32)


def reference_transcripts(snapshot: Path, chunks: list[np.ndarray], **generate_kwargs) -> list[list[int]]:
    """The tiny model's own `generate` over the chunks, batched as the server batches them, without
    the decoder prompt (start of transcript, language, task) that generate returns first."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    processor = WhisperProcessor.from_pretrained(snapshot)
    model = WhisperForConditionalGeneration.from_pretrained(snapshot).eval()
    features = processor.feature_extractor(chunks, sampling_rate=16000, return_tensors="pt").input_features
    with torch.inference_mode():
        out = model.generate(features, force_unique_generate_call=True, **generate_kwargs)
    prompt_length = 3 + (not generate_kwargs.get("return_timestamps")) + len(generate_kwargs.get("prompt_ids", []))
    return out[:, prompt_length:].tolist()
