"""Loads a model spec into what an engine needs: a `LoadedModel` for the paged text engine, a
Whisper `Transcriber`, or an `Embedder` (an embedding model, no KV cache). Runs in a worker thread, before any actor starts."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from transerve.config import EngineConfig
from transerve.engine import models
from transerve.engine.core import EngineCore
from transerve.engine.cpu_linear import transposed_copy_bytes
from transerve.engine.embedding import Embedder, load_embedder, pooling_spec
from transerve.engine.kv_sizing import choose_num_kv_blocks, context_length
from transerve.engine.model_runner import ModelRunner
from transerve.engine.models import load_model, resolve_device, resolve_dtype
from transerve.engine.quantize import precision
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
    precision: str = ""  # what the linears compute in: 'Q4_1+Q8_0', 'int8', 'float32', ...


def load(spec: str, config: EngineConfig, allow_download: bool,
         allow_local_paths: bool = True) -> LoadedModel | Transcriber | Embedder:
    resolved = models.resolve(spec, allow_download=allow_download, allow_local_paths=allow_local_paths)
    path = models.materialize(resolved, config.trust_remote_code)
    device = resolve_device(config.device)
    config = dataclasses.replace(config, scheduler=config.scheduler.for_device(device.type))
    if is_speech_to_text(path):  # Whisper: served by the transcriber actor, not the paged text engine
        return load_transcriber(spec, path, config, device, resolve_dtype(config.dtype, device))
    if (pooling := pooling_spec(path)) is not None:  # served by the embedder actor, without a KV cache
        device = resolve_device(config.device)
        return load_embedder(spec, path, pooling, config, device, resolve_dtype(config.dtype, device))
    tokenizer = models.load_tokenizer(resolved, config.trust_remote_code)
    generation_config = models.load_generation_config(resolved)
    device = resolve_device(config.device)
    if config.tensor_parallel_size > 1:  # rank 0 here, ranks 1..N-1 in their own processes (parallel/ranks.py)
        from transerve.parallel.ranks import start_tensor_parallel

        runner, num_kv_blocks, max_model_len = start_tensor_parallel(path, config, resolve_dtype(config.dtype, device))
        model = runner.model
    else:
        model = load_model(path, config, device, resolve_dtype(config.dtype, device))
        max_model_len = context_length(model.config.get_text_config(), config)
        num_kv_blocks = choose_num_kv_blocks(model, config, max_model_len)
        runner = ModelRunner(model, config, num_kv_blocks, max_model_len)
    text_config = model.config.get_text_config()
    core = EngineCore(config.scheduler, num_kv_blocks, config.cache.block_size, max_model_len, config.cache.enable_prefix_caching)
    eos = generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    defaults = models.generation_defaults(generation_config, dict(config.override_generation_config))
    weights = precision(model)
    kv = runner.kv_caches[0][0] if getattr(runner, "kv_caches", None) else None  # a TP rank-0 runner holds them too
    kv_note = f" ({str(kv.dtype)[6:]}{', committed as used' if kv.device.type == 'cpu' else ''})" if kv is not None else ""
    log.info("loaded %s on %s in %s: %d KV blocks of %d tokens%s, context %d, sampling defaults %s", spec, device, weights,
             num_kv_blocks, config.cache.block_size, kv_note, max_model_len, defaults)
    if copy_bytes := transposed_copy_bytes(model):
        log.info("CPU: a transposed copy of the linear weights (%.0f MB) speeds up single-sequence decoding", copy_bytes / 2**20)
    head = model.get_output_embeddings()
    vocab_size = head.out_features if head is not None else text_config.vocab_size
    image_prompts = None
    if runner.multimodal is not None:
        from transerve.media.processor import ImagePrompts

        image_prompts = ImagePrompts.load(path, tokenizer, model, config.trust_remote_code)
    return LoadedModel(spec, tokenizer, runner, core, frozenset(eos_ids), defaults, max_model_len, vocab_size, image_prompts,
                       precision=weights)
