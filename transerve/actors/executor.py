"""Executor actor: the only code that touches the model, the KV cache and the device."""

from __future__ import annotations

import logging

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from transerve.actors.messages import ExecuteStep, StepResult
from transerve.engine.model_runner import ModelRunner

log = logging.getLogger(__name__)


async def executor_actor(
    runner: ModelRunner,
    inbox: ObjectReceiveStream[ExecuteStep],
    to_scheduler: ObjectSendStream[StepResult],
) -> None:
    async with inbox, to_scheduler:
        async for message in inbox:
            try:
                # A worker thread keeps the event loop serving HTTP while the model computes.
                sampled = await anyio.to_thread.run_sync(runner.execute, message.seqs)
            except Exception as exc:
                log.exception("model step failed for %d requests", len(message.seqs))
                await to_scheduler.send(StepResult((), error=f"{type(exc).__name__}: {exc}"))
                continue
            await to_scheduler.send(StepResult(tuple(sampled.items())))
