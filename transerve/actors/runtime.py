"""Builds the bounded mailboxes, starts the four actors of a model, and gives handlers one client.

`EngineClient.generate(...)` (in client.py) is all the HTTP layer sees of an engine. `Models` loads
engines by name on first use, once even when many requests ask at the same time; each engine's actors
run in their own task group, so one model can be stopped (after `--model-timeout` idle seconds, or
when it crashes) while the others serve.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import TaskGroup

from transerve.actors.client import EngineClient, GenerateRequest  # noqa: F401 (re-exported)
from transerve.actors.detokenizer import detokenizer_actor
from transerve.actors.executor import executor_actor
from transerve.actors.metrics import EngineMetrics
from transerve.actors.scheduler import SchedulerActor
from transerve.actors.tokenizer import tokenizer_actor
from transerve.actors.transcriber import TranscriptionEngine, start_transcriber
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
    if is_speech_to_text(path):  # Whisper: served by the transcriber actor, not the paged text engine
        device = resolve_device(config.device)
        return load_transcriber(spec, path, config, device, resolve_dtype(config.dtype, device))
    tokenizer = models.load_tokenizer(resolved, config.trust_remote_code)
    generation_config = models.load_generation_config(resolved)
    device = resolve_device(config.device)
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
    defaults = {k: getattr(generation_config, k) for k in ("temperature", "top_p", "top_k", "min_p")}
    if not generation_config.do_sample:
        defaults = {}  # the model's config says nothing about sampling: the OpenAI defaults apply
    log.info("loaded %s on %s: %d KV blocks of %d tokens, context %d", spec, device, num_kv_blocks,
             config.cache.block_size, max_model_len)
    if copy_bytes := transposed_copy_bytes(model):
        log.info("CPU: a transposed copy of the linear weights (%.0f MB) speeds up single-sequence decoding", copy_bytes / 2**20)
    head = model.get_output_embeddings()
    vocab_size = head.weight.shape[0] if head is not None else text_config.vocab_size
    image_prompts = None
    if runner.multimodal is not None:
        from transerve.media.processor import ImagePrompts

        image_prompts = ImagePrompts.load(path, tokenizer, model, config.trust_remote_code)
    return LoadedModel(spec, tokenizer, runner, core, frozenset(eos_ids), defaults, max_model_len, vocab_size, image_prompts)


async def start_engine(task_group: TaskGroup, loaded: LoadedModel | Transcriber, mailbox_size: int,
                       metrics: EngineMetrics | None = None) -> EngineClient | TranscriptionEngine:
    if isinstance(loaded, Transcriber):
        return await start_transcriber(task_group, loaded, mailbox_size, metrics if metrics is not None else EngineMetrics())
    tok_send, tok_recv = anyio.create_memory_object_stream(mailbox_size)
    sched_send, sched_recv = anyio.create_memory_object_stream(mailbox_size)
    exec_send, exec_recv = anyio.create_memory_object_stream(1)
    result_send, result_recv = anyio.create_memory_object_stream(1)
    detok_send, detok_recv = anyio.create_memory_object_stream(mailbox_size)
    scheduler = SchedulerActor(loaded.core, loaded.eos_token_ids, sched_recv, exec_send, result_recv, detok_send.clone())
    task_group.start_soon(tokenizer_actor, loaded.tokenizer, loaded.max_model_len, loaded.core.kv_capacity, tok_recv,
                          detok_send, sched_send, loaded.image_prompts)
    task_group.start_soon(scheduler.run)
    task_group.start_soon(executor_actor, loaded.runner, exec_recv, result_send)
    task_group.start_soon(detokenizer_actor, loaded.tokenizer, detok_recv)
    return EngineClient(loaded, tok_send, metrics)


@dataclass
class Models:
    """The engines of this server: one pinned model, or any model loaded by name on first use."""

    config: EngineConfig
    task_group: TaskGroup
    mailbox_size: int = 1024
    forced: str | None = None
    allow_download: bool = False
    model_timeout: float | None = None  # unload a model idle this many seconds (never the forced one)
    metrics: EngineMetrics = field(default_factory=EngineMetrics)  # this server's own Prometheus registry
    engines: dict[str, EngineClient] = field(default_factory=dict)
    _locks: dict[str, anyio.Lock] = field(default_factory=dict)

    async def aclose(self) -> None:
        """Stop taking requests; each engine's actors finish what they hold and return."""
        for engine in list(self.engines.values()):
            await engine.aclose()

    async def get(self, name: str | None, task: str = "text") -> EngineClient | TranscriptionEngine:
        """The engine serving `name` for `task` ("text" or "transcription"); raises
        models.ModelNotFoundError, or models.ModelTaskError when the model does the other task."""
        spec = self.forced or name
        if not spec:
            raise models.ModelNotFoundError("no model given; pass `model` in the request")
        engine = self.engines.get(spec)
        if engine is None:
            lock = self._locks.setdefault(spec, anyio.Lock())
            try:
                async with lock:
                    engine = self.engines.get(spec)
                    if engine is None:
                        allow_download = self.allow_download and spec == self.forced
                        # Only the operator's MODEL may be a local path; a request's `model` never is.
                        loaded = await anyio.to_thread.run_sync(load, spec, self.config, allow_download, spec == self.forced)
                        engine = await self.task_group.start(self._run_engine, spec, loaded)
            finally:
                # A lock kept for every name ever asked for (most of them unknown) would grow without bound.
                if not lock.locked() and lock.statistics().tasks_waiting == 0 and self._locks.get(spec) is lock:
                    del self._locks[spec]
        engine.touch()  # before any await: an engine handed out is never idle long enough to unload
        if task == "transcription" and not isinstance(engine, TranscriptionEngine):
            raise models.ModelTaskError(f"{spec} is a text model; it cannot transcribe audio (use a Whisper model)")
        if task == "text" and isinstance(engine, TranscriptionEngine):
            raise models.ModelTaskError(f"{spec} is a speech recognition model: send audio to /v1/audio/transcriptions")
        return engine

    async def _run_engine(self, spec: str, loaded: LoadedModel, *, task_status=anyio.TASK_STATUS_IGNORED) -> None:
        """Run one model's actors in their own task group until it is unloaded, shut down, or crashes."""
        engine = None
        try:
            async with anyio.create_task_group() as task_group:
                engine = await start_engine(task_group, loaded, self.mailbox_size, self.metrics)
                self.engines[spec] = engine
                del loaded  # the engine holds the model now: unloading it must free the memory
                task_status.started(engine)
                if self.model_timeout is not None and self.model_timeout > 0 and spec != self.forced:
                    task_group.start_soon(self._unload_when_idle, spec, engine)
        except Exception:  # one model's crash must not take the server (and the other models) down
            log.exception("the engine of %s failed; it will be loaded again on its next request", spec)
        finally:
            if engine is not None and self.engines.get(spec) is engine:
                del self.engines[spec]
            engine = None
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_free_memory)

    async def _unload_when_idle(self, spec: str, engine: EngineClient) -> None:
        while not engine.closed.is_set():
            idle_until = engine.last_used + self.model_timeout
            with anyio.move_on_after(max(idle_until - anyio.current_time(), 0.05)):
                await engine.closed.wait()
            if engine.in_flight == 0 and anyio.current_time() >= engine.last_used + self.model_timeout:
                log.info("unloading %s after %.0f s idle", spec, self.model_timeout)
                if self.engines.get(spec) is engine:
                    del self.engines[spec]
                await engine.aclose()  # the actors drain (nothing is in flight) and the task group ends


def _free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
