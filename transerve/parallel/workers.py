"""Ranks 1..N-1 as rank 0 sees them: their processes, the pipe to each, and whether one has failed.

Rank 0 watches them beside the engine's actors. When a rank dies (or a step fails part way, which leaves
the ranks out of step for good), the requests in flight fail through the executor's error path, the
remaining workers are killed, and the server stops with TensorParallelError; if rank 0 itself is stuck
in a collective that can no longer complete, it exits after EXIT_DEADLINE_S regardless.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing.connection
import os
import pickle
import signal
import threading
import time

import anyio
import torch
import torch.distributed as dist

from transerve.parallel.steps import TensorParallelError

log = logging.getLogger(__name__)

WORKER_STOP_TIMEOUT_S = 5.0
STOP = pickle.dumps(None)  # the message that ends a worker's loop
FAILURE_GRACE_S = 2.0  # after a rank fails, for the failed step's error to reach its requests' clients
EXIT_DEADLINE_S = 15.0  # after a rank fails, the server is gone by then even if rank 0 is stuck in a collective


class WorkerRanks:
    """Ranks 1..N-1 as rank 0 sees them: their processes, the pipe to each, and whether one has failed."""

    def __init__(self, processes: list, conns: list) -> None:
        self.processes = processes
        self.conns = conns
        self.num_threads = torch.get_num_threads()  # rank 0 shares the cores while the workers live
        self.failure: str | None = None
        self.start_error: Exception | None = None
        atexit.register(self.stop_workers)  # before multiprocessing's own exit hook, which would wait on them

    def start(self, their_ends: list) -> None:
        try:
            for process, there in zip(self.processes, their_ends):
                process.start()
                there.close()
        except Exception as exc:  # re-raised by the loading thread
            self.start_error = exc

    def send(self, data: bytes) -> None:
        try:
            for conn in self.conns:
                conn.send_bytes(data)
        except OSError as exc:  # a broken pipe: a worker is gone
            self.fail(self.wait_dead_rank() or f"a tensor-parallel worker cannot be reached: {exc}")
            raise TensorParallelError(self.failure) from exc

    def wait_dead_rank(self, timeout: float = 1.0) -> str | None:
        """The dead rank, waiting a moment for a dying one's exit code (a failed collective may come first)."""
        multiprocessing.connection.wait([p.sentinel for p in self.processes], timeout)
        return self.dead_rank()

    def dead_rank(self) -> str | None:
        for rank, process in enumerate(self.processes, start=1):
            if process.exitcode is not None:
                how = f"was killed by {signal.Signals(-process.exitcode).name}" if process.exitcode < 0 else \
                    f"exited with code {process.exitcode}"
                return f"tensor-parallel rank {rank} (pid {process.pid}) {how}"
        return None

    def fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason

    def receive_all(self) -> list:
        """One message from every worker, in rank order; raises when a worker dies first."""
        pending = dict(enumerate(self.conns))
        messages = {}
        while pending:
            ready = multiprocessing.connection.wait([*pending.values(), *(p.sentinel for p in self.processes)])
            for i, conn in list(pending.items()):
                if conn in ready and conn.poll():
                    try:
                        messages[i] = conn.recv()
                    except EOFError:  # it is exiting: wait for its exit code below
                        self.processes[i].join(WORKER_STOP_TIMEOUT_S)
                        continue
                    del pending[i]
            if pending and (dead := self.dead_rank()):
                raise RuntimeError(f"{dead} while starting; see its log above")
        return [messages[i] for i in range(len(self.conns))]

    async def watch(self, engine_closed: anyio.Event) -> None:
        """Beside the engine's actors: when a rank dies or a step fails, fail what is in flight, then stop
        the server (it raises TensorParallelError); when the engine closes first, stop the workers."""
        while self.failure is None and not engine_closed.is_set():
            if dead := self.dead_rank():
                self.fail(dead)
            else:
                with anyio.move_on_after(0.2):
                    await engine_closed.wait()
        # A failed group is killed at once, which also frees rank 0 from a collective it may wait in.
        await anyio.to_thread.run_sync(self.stop_workers, self.failure is None)
        if self.failure is None:
            return
        log.error("%s; failing the requests in flight and stopping the server", self.failure)
        deadline = threading.Timer(EXIT_DEADLINE_S, _exit_now, args=(self.failure,))
        deadline.daemon = True
        deadline.start()
        await anyio.sleep(FAILURE_GRACE_S)
        raise TensorParallelError(self.failure)

    def stop_workers(self, graceful: bool = True) -> None:
        """Stop every worker (idempotent): asked first when `graceful`, killed when they do not go."""
        started = [p for p in self.processes if p.pid is not None]
        if graceful:
            for conn in self.conns:
                try:
                    conn.send_bytes(STOP)
                except OSError:
                    pass
            deadline = time.monotonic() + WORKER_STOP_TIMEOUT_S
            for process in started:
                process.join(max(0.0, deadline - time.monotonic()))
        for process in started:
            if process.exitcode is None:
                process.kill()
        for process in started:
            process.join(WORKER_STOP_TIMEOUT_S)

    def close(self) -> None:
        """Stop the workers and leave the process group, so this process can start another one (tests)."""
        self.stop_workers()
        for conn in self.conns:
            conn.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.set_num_threads(self.num_threads)


def _exit_now(failure: str) -> None:
    log.critical("%s; rank 0 did not stop within %.0f s, exiting now", failure, EXIT_DEADLINE_S)
    os._exit(1)
