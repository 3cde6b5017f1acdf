"""A task group as long-lived as a Ray Serve replica.

Serve owns the replica's event loop and calls `__init__`, each method and `__del__` in tasks of its
own, so a task group opened in one of them cannot outlive it. The group runs in one background task
instead: `start` waits until `setup(task_group)` has returned (or raised), `stop` lets `teardown` run
and the group finish.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import anyio
from anyio.abc import TaskGroup

T = TypeVar("T")


class Lifetime(Generic[T]):
    def __init__(self) -> None:
        self._stop = anyio.Event()
        self._task: asyncio.Task | None = None

    async def start(self, setup: Callable[[TaskGroup], Awaitable[T]],
                    teardown: Callable[[T], Awaitable[None]]) -> T:
        started: asyncio.Future[T] = asyncio.get_running_loop().create_future()

        async def run() -> None:
            try:
                async with anyio.create_task_group() as task_group:
                    value = await setup(task_group)
                    started.set_result(value)
                    await self._stop.wait()
                    await teardown(value)
                    task_group.cancel_scope.cancel()
            except BaseException as exc:
                if not started.done():
                    started.set_exception(exc)
                raise

        self._task = asyncio.get_running_loop().create_task(run())
        return await started

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=10)
