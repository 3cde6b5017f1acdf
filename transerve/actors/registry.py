"""The engines of this server: `Models` loads engines by name on first use, once even when many
requests ask at the same time. Each engine's actors run in their own task group, so one model can be
stopped (after `--model-timeout` idle seconds, or when it crashes) while the others serve.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup

from transerve.actors.assembly import LoadedModel, load
from transerve.actors.client import EngineClient
from transerve.actors.embedding_client import EmbeddingClient
from transerve.actors.metrics import EngineMetrics
from transerve.actors.runtime import start_engine
from transerve.actors.transcription_client import TranscriptionClient
from transerve.config import EngineConfig
from transerve.engine import models
from transerve.engine.embedding import Embedder
from transerve.engine.whisper import Transcriber
from transerve.parallel.steps import TensorParallelError

log = logging.getLogger(__name__)
Engine = EngineClient | TranscriptionClient | EmbeddingClient


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
    engines: dict[str, Engine] = field(default_factory=dict)
    _locks: dict[str, anyio.Lock] = field(default_factory=dict)

    async def aclose(self) -> None:
        """Stop taking requests; each engine's actors finish what they hold and return."""
        for engine in list(self.engines.values()):
            await engine.aclose()

    async def get(self, name: str | None, task: str | None = "text") -> Engine:
        """The engine serving `name` for `task` ("text", "transcription", "embedding", or None: whatever the
        model does); raises models.ModelNotFoundError, or models.ModelTaskError when the model does another task."""
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
        if task in ("text", "transcription") and isinstance(engine, EmbeddingClient):
            raise models.ModelTaskError(f"{spec} is an embedding model: send its inputs to /v1/embeddings")
        if task == "embedding" and not isinstance(engine, EmbeddingClient):
            raise models.ModelTaskError(f"{spec} is not an embedding model (a sentence-transformers model, or one "
                                        "without an LM head); it cannot embed")
        if task == "transcription" and not isinstance(engine, TranscriptionClient):
            raise models.ModelTaskError(f"{spec} is a text model; it cannot transcribe audio (use a Whisper model)")
        if task == "text" and isinstance(engine, TranscriptionClient):
            raise models.ModelTaskError(f"{spec} is a speech recognition model: send audio to /v1/audio/transcriptions")
        return engine

    async def _run_engine(self, spec: str, loaded: LoadedModel | Transcriber | Embedder, *,
                          task_status=anyio.TASK_STATUS_IGNORED) -> None:
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
        except Exception as exc:  # one model's crash must not take the server (and the other models) down
            if isinstance(exc, ExceptionGroup) and exc.subgroup(TensorParallelError) is not None:
                raise  # a dead rank: the model cannot be served again, so the server stops
            log.exception("the engine of %s failed; it will be loaded again on its next request", spec)
        finally:
            if engine is not None and self.engines.get(spec) is engine:
                del self.engines[spec]
            engine = None
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_free_memory)

    async def _unload_when_idle(self, spec: str, engine: Engine) -> None:
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
