"""Executor actor: the only code that touches the model, the KV cache and the device."""

from __future__ import annotations

import logging

import anyio
import torch
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from transerve.actors.messages import ExecuteStep, StepResult
from transerve.engine.model_runner import ModelRunner

log = logging.getLogger(__name__)


async def executor_actor(
    runner: ModelRunner,
    inbox: ObjectReceiveStream[ExecuteStep],
    to_scheduler: ObjectSendStream[StepResult],
) -> None:
    """A step that raises (a bug in forward, out of memory) becomes a StepResult with an error: the
    scheduler fails that step's requests and the next step runs as usual."""
    seen: dict[str, int] = {}  # how often each distinct failure happened, so a repeating one logs once
    async with inbox, to_scheduler:
        async for message in inbox:
            try:
                # A worker thread keeps the event loop serving HTTP while the model computes.
                result = StepResult(await anyio.to_thread.run_sync(runner.execute, message.step))
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                _log_failure(seen, error, message.step.num_requests)
                if isinstance(exc, torch.OutOfMemoryError):
                    # The failed step's activations are garbage now; give their memory back to the
                    # allocator so the next, maybe smaller, step can run.
                    await anyio.to_thread.run_sync(torch.cuda.empty_cache)
                result = StepResult(error=error)
            await to_scheduler.send(result)


def _log_failure(seen: dict[str, int], error: str, num_requests: int) -> None:
    if len(seen) > 256:  # errors that embed sizes or ids are all distinct: keep the memory bounded
        seen.clear()
    count = seen[error] = seen.get(error, 0) + 1
    if count == 1:
        log.exception("model step failed; failing its %d requests", num_requests)
    else:
        log.error("model step failed again (%d times so far), failing its %d requests: %s", count, num_requests, error)
