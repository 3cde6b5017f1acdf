"""Compiles a CPU model's decode steps (engine/compiled_step.py) while the server runs them eagerly.

Steps saved by an earlier start load at once. Missing ones compile in a child process that loads the same
model with the same engine config and saves each batch-size bucket as it is done; the server loads each
as it appears. Not a thread of the server: tracing and inductor's code generation are Python that holds
the GIL for minutes, and the eager steps, which take it back after every op, slowed ~100x beside it.
The waiting runs on a daemon thread, so stopping the server never waits for a compile.

    python -m transerve.actors.background_compile   # the child: (spec, EngineConfig, artifacts) pickled on stdin
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import subprocess
import sys
import threading
import time

from transerve.config import EngineConfig
from transerve.engine.compiled_step import CompiledDecode
from transerve.engine.model_runner import ModelRunner

log = logging.getLogger(__name__)
POLL_S = 1.0


class BackgroundCompile:
    def __init__(self, spec: str, config: EngineConfig, graphs: CompiledDecode) -> None:
        self.spec, self.config, self.graphs = spec, config, graphs
        self.stopped = threading.Event()
        self.child: subprocess.Popen | None = None

    @classmethod
    def of(cls, spec: str, runner: ModelRunner) -> "BackgroundCompile | None":
        graphs = getattr(runner, "graphs", None)  # a tensor-parallel runner has none
        return cls(spec, runner.config, graphs) if isinstance(graphs, CompiledDecode) else None

    def start(self) -> None:
        threading.Thread(target=self._run, name="transerve-compile", daemon=True).start()

    def stop(self) -> None:
        """No more compiling: the model is unloading or the server stopping (which does not wait for the thread)."""
        self.stopped.set()
        if self.child is not None:
            self.child.kill()

    def _run(self) -> None:
        start = time.perf_counter()
        if loaded := self.graphs.load_saved():
            log.info("loaded the compiled decode steps for batch sizes %s in %.1f s", _sizes(loaded), time.perf_counter() - start)
        exit_status = None
        if self.graphs.missing() and (exit_status := self._compile_in_child()) is None:
            return  # stopped
        if missing := self.graphs.missing():
            log.warning("compiling the decode steps failed (exit status %s): batch sizes %s run eagerly",
                        exit_status, _sizes(missing))
        else:
            log.info("decode steps of up to %d sequences run compiled", max(self.graphs.buckets))

    def _compile_in_child(self) -> int | None:
        """Compile the missing buckets in a child process, loading each as it is saved; its exit status, or
        None when stopped meanwhile."""
        log.info("compiling the decode steps for batch sizes %s in a background process (minutes the first time; "
                 "saved under %s); until each is ready, those steps run eagerly", _sizes(self.graphs.missing()),
                 self.graphs.artifacts)
        # The child sizes nothing itself: the same KV blocks, so the same graph.
        config = dataclasses.replace(self.config, cache=dataclasses.replace(self.config.cache,
                                                                            num_kv_blocks=self.graphs.scratch_block))
        self.child = child = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE)
        if self.stopped.is_set():  # stopped as it started, before self.child was there to kill
            child.kill()
            return None
        try:
            child.stdin.write(pickle.dumps((self.spec, config, self.graphs.artifacts)))
            child.stdin.close()
        except BrokenPipeError:  # killed by stop() meanwhile
            return None
        while child.poll() is None:
            if self.stopped.wait(POLL_S):
                return None
            self.graphs.load_saved()
        self.graphs.load_saved()
        return child.returncode


def _sizes(buckets: list[int]) -> str:
    return ", ".join(map(str, buckets))


def main() -> None:
    from transerve.actors.assembly import load

    # The lowest CPU priority (inherited by inductor's compile workers): the server's own steps come first; on a
    # 2-core box a compile beside them at equal priority made their OpenMP threads wait and steps ~10x slower.
    os.nice(19)
    spec, config, artifacts = pickle.load(sys.stdin.buffer)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("transerve.engine.compiled_step").setLevel(logging.INFO)
    graphs = load(spec, config, allow_download=False).runner.graphs
    if graphs.artifacts != artifacts:  # a bug: the parent would never find these steps
        sys.exit(f"background compile: this process would save under {graphs.artifacts}, the server reads {artifacts}")
    graphs.compile_buckets()
    sys.exit(1 if graphs.failed else 0)


if __name__ == "__main__":
    main()
