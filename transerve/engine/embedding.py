"""Embedding models: recognising them on disk, loading, one batched forward of many inputs, pooling.

A sentence-transformers repository says how to pool in its own files (`modules.json`, the Pooling
module's `config.json`, a `Normalize` module); without them, a decoder (a model type that has a causal
LM and no masked LM) pools its last token and an encoder its first ([CLS]), both normalised, as vLLM
does. The model runs without a KV cache: each forward pass is a padded batch of whole inputs, sorted
by length so that little is padding. Everything here is synchronous; the embedder actor calls `embed`
in a worker thread.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transerve.config import EngineConfig
from transerve.engine.models import ModelTaskError

DEFAULT_BATCH_TOKENS = 8192  # padded tokens in one forward pass


class Pooling(str, enum.Enum):
    MEAN = "mean"
    CLS = "cls"
    LAST_TOKEN = "lasttoken"


@dataclass(frozen=True)
class PoolingSpec:
    """What the model's files say about turning its hidden states into one vector per input."""

    pooling: Pooling
    normalize: bool
    max_seq_length: int | None = None  # sentence-transformers' own limit, below the model's positions
    matryoshka_dimensions: tuple[int, ...] | None = None  # None: no truncation; (): any size; else these
    subfolder: str = ""  # where the transformer's files are (older sentence-transformers repos: 0_Transformer)


@dataclass(frozen=True)
class Embedder:
    """A loaded embedding model: its tokenizer, how it pools, and the longest input it takes."""

    model_id: str
    model: Any
    tokenizer: Any
    spec: PoolingSpec
    dimensions: int  # the size of each vector
    max_input_tokens: int
    vocab_size: int
    device: torch.device
    max_batch_tokens: int = DEFAULT_BATCH_TOKENS


class EmbeddingInputError(ValueError):
    """A request this model cannot embed as asked (a 400 naming `param`)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _matryoshka(*configs: dict) -> tuple[int, ...] | None:
    """vLLM's convention in config.json: `matryoshka_dimensions` (the sizes allowed) or `is_matryoshka`."""
    for config in configs:
        if config.get("matryoshka_dimensions"):
            return tuple(int(d) for d in config["matryoshka_dimensions"])
        if config.get("is_matryoshka"):
            return ()
    return None


def _pooling_mode(config: dict) -> str:
    """The mode of a Pooling module's config: `pooling_mode` (sentence-transformers 6) or the older
    `pooling_mode_*` switches; more than one at once (concatenated vectors) is not supported."""
    if "pooling_mode" in config:
        mode = config["pooling_mode"]
        modes = [mode] if isinstance(mode, str) else list(mode)
    else:
        names = {"cls_token": "cls", "mean_tokens": "mean", "lasttoken": "lasttoken", "max_tokens": "max",
                 "mean_sqrt_len_tokens": "mean_sqrt_len_tokens", "weightedmean_tokens": "weightedmean"}
        modes = [mode for key, mode in names.items() if config.get(f"pooling_mode_{key}")]
    if len(modes) != 1 or modes[0] not in {p.value for p in Pooling}:
        raise ModelTaskError(f"pooling {'+'.join(modes) or 'none'} is not supported (mean, cls or lasttoken)")
    return modes[0]


def pooling_spec(path: str) -> PoolingSpec | None:
    """How to pool the model at `path`, or None when it is not an embedding model."""
    root = Path(path)
    config = _read(root / "config.json")
    modules = _read(root / "modules.json") if (root / "modules.json").is_file() else None
    if modules is not None:
        kinds = {m.get("type", "").rsplit(".", 1)[-1]: m.get("path", "") for m in modules}
        if unknown := set(kinds) - {"Transformer", "Pooling", "Normalize"}:
            raise ModelTaskError(f"sentence-transformers modules {sorted(unknown)} are not supported "
                                 "(Transformer, Pooling and Normalize are)")
        pooling = Pooling(_pooling_mode(_read(root / kinds.get("Pooling", "1_Pooling") / "config.json")))
        subfolder = kinds.get("Transformer", "")
        st_config = _read(root / subfolder / "sentence_bert_config.json") or _read(root / "sentence_bert_config.json")
        return PoolingSpec(pooling, "Normalize" in kinds, st_config.get("max_seq_length"),
                           _matryoshka(_read(root / subfolder / "config.json"), config,
                                       _read(root / "config_sentence_transformers.json")), subfolder)
    architectures = config.get("architectures") or []
    if not architectures or not all(a.endswith("Model") and "For" not in a and "LMHead" not in a for a in architectures):
        return None
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    kind = config.get("model_type")  # BERT-likes have a causal LM head too; masked LM heads are encoders' alone
    decoder = kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    return PoolingSpec(Pooling.LAST_TOKEN if decoder else Pooling.CLS, True, None, _matryoshka(config))


def load_embedder(model_id: str, path: str, spec: PoolingSpec, config: EngineConfig, device: torch.device,
                  dtype: torch.dtype) -> Embedder:
    from transformers import AutoModel, AutoTokenizer

    path = str(Path(path) / spec.subfolder)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    model = AutoModel.from_pretrained(path, dtype=dtype, attn_implementation="sdpa",
                                      trust_remote_code=config.trust_remote_code)
    model = model.to(device).eval()
    text_config = model.config.get_text_config()
    limits = [n for n in (spec.max_seq_length, config.scheduler.max_model_len, tokenizer.model_max_length,
                          getattr(text_config, "max_position_embeddings", None)) if n and n < 10**6]
    if tokenizer.pad_token_id is None:  # decoders often have none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.convert_ids_to_tokens(0)
    batch_tokens = max(config.scheduler.max_num_batched_tokens, DEFAULT_BATCH_TOKENS)
    return Embedder(model_id, model, tokenizer, spec, text_config.hidden_size, min(limits) if limits else 512,
                    text_config.vocab_size, device, batch_tokens)


def tokenize(e: Embedder, inputs: Sequence[str | tuple[int, ...]], truncate: int | None) -> list[tuple[int, ...]]:
    """Each input as token ids, no longer than the model takes: texts with the tokenizer's special
    tokens, token ids as given. Longer is an error unless `truncate` (-1: to the model's limit) asks."""
    if truncate is not None and truncate > e.max_input_tokens:
        raise EmbeddingInputError(f"truncate_prompt_tokens: at most {e.max_input_tokens}, this model's input limit",
                                  "truncate_prompt_tokens")
    limit = e.max_input_tokens if truncate in (None, -1) else truncate
    texts = [text for text in inputs if isinstance(text, str)]
    encoded = iter(e.tokenizer(texts, truncation=truncate is not None, max_length=limit)["input_ids"] if texts else ())
    rows, right = [], e.tokenizer.truncation_side == "right"
    for item in inputs:
        ids = tuple(next(encoded)) if isinstance(item, str) else item
        if isinstance(item, tuple) and any(t >= e.vocab_size for t in item):
            raise EmbeddingInputError(f"input: token ids must be between 0 and {e.vocab_size - 1}", "input")
        if len(ids) > limit:
            if truncate is None:
                raise EmbeddingInputError(f"input: an input of {len(ids)} tokens is longer than this model's "
                                          f"{e.max_input_tokens}; shorten it, or set truncate_prompt_tokens", "input")
            ids = ids[:limit] if right else ids[-limit:]
        rows.append(ids)
    return rows


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """[batch, tokens, width] over right-padded inputs (mask 1 on real tokens) -> [batch, width]."""
    if pooling is Pooling.CLS:
        return hidden[:, 0]
    if pooling is Pooling.LAST_TOKEN:
        return hidden[torch.arange(len(hidden)), mask.sum(1) - 1]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def batches(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Row indices grouped into forward passes: longest first, each pass's padded size within max_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    out: list[list[int]] = []
    for i in order:
        if out and lengths[out[-1][0]] * (len(out[-1]) + 1) <= max_tokens:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def embed(e: Embedder, rows: Sequence[tuple[int, ...]]) -> tuple[np.ndarray, int]:
    """One vector per row (float32, normalised when the model is), and the forward passes it took."""
    out = np.empty((len(rows), e.dimensions), dtype=np.float32)
    groups = batches([len(r) for r in rows], e.max_batch_tokens)
    pad = e.tokenizer.pad_token_id
    with torch.inference_mode():
        for group in groups:
            width = len(rows[group[0]])
            ids = torch.full((len(group), width), pad, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for j, i in enumerate(group):
                ids[j, :len(rows[i])] = torch.tensor(rows[i])
                mask[j, :len(rows[i])] = 1
            mask = mask.to(e.device)
            padded = len(rows[group[-1]]) < width  # without padding no mask is built: attention takes a faster path
            hidden = e.model(input_ids=ids.to(e.device), attention_mask=mask if padded else None).last_hidden_state
            vectors = pool(hidden, mask, e.spec.pooling).float()
            if e.spec.normalize:
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
            out[group] = vectors.cpu().numpy()
    return out, len(groups)


def check_dimensions(e: Embedder, dimensions: int | None) -> None:
    """Raises EmbeddingInputError unless the model gives vectors of `dimensions` (None: its own size)."""
    if dimensions is None or dimensions == e.dimensions:
        return
    allowed = e.spec.matryoshka_dimensions
    if allowed is None:
        raise EmbeddingInputError(f"dimensions: this model's vectors have {e.dimensions} dimensions and it does not "
                                  "declare Matryoshka training (is_matryoshka / matryoshka_dimensions in its config)",
                                  "dimensions")
    if dimensions > e.dimensions or (allowed and dimensions not in allowed):
        sizes = ", ".join(map(str, allowed)) if allowed else f"1 to {e.dimensions}"
        raise EmbeddingInputError(f"dimensions: this model gives {sizes}", "dimensions")


def shorten(vectors: np.ndarray, dimensions: int | None, e: Embedder) -> np.ndarray:
    """Matryoshka: the first `dimensions` of each vector, normalised again when the model normalises."""
    check_dimensions(e, dimensions)
    if dimensions is None or dimensions == e.dimensions:
        return vectors
    cut = vectors[:, :dimensions]
    if e.spec.normalize:
        cut = cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(cut, dtype=np.float32)
