"""Loads a model spec into what an engine needs: a `LoadedModel` for the paged text engine, or a
Whisper `Transcriber`. Runs in a worker thread, before any actor starts."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from transerve.config import EngineConfig
from transerve.engine import models
from transerve.engine.core import EngineCore
from transerve.engine.cpu_linear import transposed_copy_bytes
from transerve.engine.kv_sizing import choose_num_kv_blocks
from transerve.engine.model_runner import ModelRunner
from transerve.engine.models import load_model, resolve_device, resolve_dtype
from transerve.engine.whisper import Transcriber, is_speech_to_text, load_transcriber

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """Everything an engine needs, loaded in a worker thread before the actors start."""

    model_id: str
    tokenizer: Any
    runner: ModelRunner
    core: EngineCore
    eos_token_ids: frozenset[int]
    generation_defaults: dict[str, Any]
    max_model_len: int
    vocab_size: int = 0  # rows of the LM head: the token ids logit_bias may name
    image_prompts: Any = None  # a VLM's ImagePrompts (media/processor.py); None: requests with images get a 400


def load(spec: str, config: EngineConfig, allow_download: bool, allow_local_paths: bool = True) -> LoadedModel | Transcriber:
    resolved = models.resolve(spec, allow_download=allow_download, allow_local_paths=allow_local_paths)
    path = models.materialize(resolved, config.trust_remote_code)
    device = resolve_device(config.device)
    config = dataclasses.replace(config, scheduler=config.scheduler.for_device(device.type))
    if is_speech_to_text(path):  # Whisper: served by the transcriber actor, not the paged text engine
        return load_transcriber(spec, path, config, device, resolve_dtype(config.dtype, device))
    tokenizer = models.load_tokenizer(resolved, config.trust_remote_code)
    generation_config = models.load_generation_config(resolved)
    model = load_model(path, config, device, resolve_dtype(config.dtype, device))
    text_config = model.config.get_text_config()
    max_model_len = getattr(text_config, "max_position_embeddings", None) or 4096
    if config.scheduler.max_model_len is not None:
        max_model_len = min(max_model_len, config.scheduler.max_model_len)
    num_kv_blocks = choose_num_kv_blocks(model, config, max_model_len)
    runner = ModelRunner(model, config, num_kv_blocks, max_model_len)
    core = EngineCore(config.scheduler, num_kv_blocks, config.cache.block_size, max_model_len, config.cache.enable_prefix_caching)
    eos = generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    defaults = models.generation_defaults(generation_config, dict(config.override_generation_config))
    log.info("loaded %s on %s: %d KV blocks of %d tokens, context %d, sampling defaults %s", spec, device, num_kv_blocks,
             config.cache.block_size, max_model_len, defaults)
    if copy_bytes := transposed_copy_bytes(model):
        log.info("CPU: a transposed copy of the linear weights (%.0f MB) speeds up single-sequence decoding", copy_bytes / 2**20)
    head = model.get_output_embeddings()
    vocab_size = head.weight.shape[0] if head is not None else text_config.vocab_size
    image_prompts = None
    if runner.multimodal is not None:
        from transerve.media.processor import ImagePrompts

        image_prompts = ImagePrompts.load(path, tokenizer, model, config.trust_remote_code)
    return LoadedModel(spec, tokenizer, runner, core, frozenset(eos_ids), defaults, max_model_len, vocab_size, image_prompts)
