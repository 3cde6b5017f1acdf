"""Executor actor: the only code that touches the model, the KV cache and the device."""

from __future__ import annotations

import dataclasses
import logging

import anyio
import torch
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from transerve.actors.messages import ExecuteStep, StepResult
from transerve.actors.background_compile import BackgroundCompile
from transerve.engine.model_runner import ModelRunner
from transerve.engine.step import ScheduledStep

log = logging.getLogger(__name__)


async def executor_actor(
    runner: ModelRunner,
    inbox: ObjectReceiveStream[ExecuteStep],
    to_scheduler: ObjectSendStream[StepResult],
    compiling: BackgroundCompile | None = None,
) -> None:
    """A step that raises (a bug in forward, out of memory) becomes a StepResult with an error: the
    scheduler fails that step's requests and the next step runs as usual. `compiling` (CPU) makes the
    decode steps' compiled graphs ready while steps run: it starts here and stops with the actor."""
    seen: dict[str, int] = {}  # how often each distinct failure happened, so a repeating one logs once
    failed = FailedRequests()
    if compiling is not None:
        compiling.start()
    try:
        async with inbox, to_scheduler:
            async for message in inbox:
                step = failed.filter(message.step)
                if step is None:  # only requests of a failed step: nothing to run
                    await to_scheduler.send(StepResult())
                    continue
                try:
                    # A worker thread keeps the event loop serving HTTP while the model computes.
                    result = StepResult(await anyio.to_thread.run_sync(runner.execute, step))
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    _log_failure(seen, error, step.num_requests)
                    failed.add(step)
                    if isinstance(exc, torch.OutOfMemoryError):
                        # The failed step's activations are garbage now; give their memory back to the
                        # allocator so the next, maybe smaller, step can run.
                        await anyio.to_thread.run_sync(torch.cuda.empty_cache)
                    result = StepResult(error=error)
                await to_scheduler.send(result)
    finally:  # the model is unloading or the server stopping: compile no more
        if compiling is not None:
            compiling.stop()


class FailedRequests:
    """The requests of failed steps, until the core has failed them. With async scheduling the next step is
    queued before a step fails; those requests' entries in it need the token the failed step never sampled,
    so they are dropped from it (the core fails them) and its other requests run as usual."""

    def __init__(self) -> None:
        self.request_ids: set[str] = set()
        self.freed_request_ids: tuple[str, ...] = ()  # of a step that had nothing left to run: for the next one

    def add(self, step: ScheduledStep) -> None:
        self.request_ids.update(step.request_ids)

    def filter(self, step: ScheduledStep) -> ScheduledStep | None:
        """The step to run, or None when nothing of it is left."""
        if not self.request_ids and not self.freed_request_ids:
            return step
        self.request_ids.difference_update(step.freed_request_ids)  # failed by the core: no later step has them
        step = step.without(self.request_ids)
        if self.freed_request_ids:
            step = dataclasses.replace(step, freed_request_ids=self.freed_request_ids + step.freed_request_ids)
        if not step.num_requests:
            self.freed_request_ids = step.freed_request_ids
            return None
        self.freed_request_ids = ()
        return step


def _log_failure(seen: dict[str, int], error: str, num_requests: int) -> None:
    if len(seen) > 256:  # errors that embed sizes or ids are all distinct: keep the memory bounded
        seen.clear()
    count = seen[error] = seen.get(error, 0) + 1
    if count == 1:
        log.exception("model step failed; failing its %d requests", num_requests)
    else:
        log.error("model step failed again (%d times so far), failing its %d requests: %s", count, num_requests, error)
