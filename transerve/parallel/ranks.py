"""Tensor-parallel ranks: rank 0 is the server's own process; ranks 1..N-1 are child processes, one per
device, each loading its shard and then running every step rank 0 sends.

Two channels. Steps go from rank 0 to each worker over a pipe (pickled once, written N-1 times): a
worker waits on it without a timeout however long the server idles, and reads end-of-file the moment
rank 0 is gone. The forward's all-reduces go over torch.distributed (NCCL on CUDA, gloo on CPU),
joined only once every rank has loaded, so a rank that fails to load is reported instead of
leaving the others waiting in a rendezvous.

Start: every rank loads and cuts its shard, and reports how many KV blocks it can hold; rank 0 takes
the smallest, every rank builds its runner with it, and a barrier proves the group before the server
says ready. A worker ignores SIGINT and SIGTERM: rank 0 owns its life, kills it when the server stops
(or at exit), and a worker whose parent is gone exits by itself.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import socket
import threading
import time
from dataclasses import dataclass

import anyio
import torch
import torch.distributed as dist

from transerve.config import EngineConfig
from transerve.engine.cpu_linear import SkinnyLinear
from transerve.engine.kv_sizing import choose_num_kv_blocks, context_length
from transerve.engine.model_runner import ModelRunner
from transerve.engine.models import load_model, resolve_device
from transerve.engine.multimodal import is_vision_language
from transerve.parallel.sharding import check_shardable, shard_model
from transerve.parallel.steps import TensorParallelError, TensorParallelRunner, serve_steps

log = logging.getLogger(__name__)

WORKER_STOP_TIMEOUT_S = 5.0
STOP = pickle.dumps(None)  # the message that ends a worker's loop
FAILURE_GRACE_S = 2.0  # after a rank fails, for the failed step's error to reach its requests' clients
EXIT_DEADLINE_S = 15.0  # after a rank fails, the server is gone by then even if rank 0 is stuck in a collective


@dataclass(frozen=True)
class RankJob:
    """What one rank needs to load its shard; pickled to each worker."""

    path: str
    config: EngineConfig
    dtype: torch.dtype
    rank: int
    init_method: str  # torch.distributed's rendezvous, chosen by rank 0
    log_level: int


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    device = resolve_device(config.device)
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise ValueError(f"--device {config.device} names one GPU; with --tensor-parallel-size, rank r runs on cuda:r "
                         "(choose the GPUs with CUDA_VISIBLE_DEVICES and give --device cuda)")
    if torch.cuda.device_count() < config.tensor_parallel_size:
        raise ValueError(f"--tensor-parallel-size {config.tensor_parallel_size} needs as many GPUs; "
                         f"{torch.cuda.device_count()} visible")
    return torch.device("cuda", rank)


def load_shard(job: RankJob) -> tuple[torch.nn.Module, int, int]:
    """(this rank's model shard, the KV blocks it can hold, the context length)."""
    config, world_size = job.config, job.config.tensor_parallel_size
    device = rank_device(config, job.rank)
    if device.type == "cpu":  # the ranks share the cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    else:
        torch.cuda.set_device(device)
    # Load on the host, cut, then move only the shard to the device.
    model = load_model(job.path, config, torch.device("cpu") if device.type == "cuda" else device, job.dtype)
    shard_model(model, job.rank, world_size)
    if device.type == "cuda":
        _plain_linears(model)
    model = model.to(device)
    max_model_len = context_length(model.config.get_text_config(), config)
    num_kv_blocks = choose_num_kv_blocks(model, config, max_model_len)
    if device.type == "cpu" and config.cache.num_kv_blocks is None:
        num_kv_blocks = max(1, num_kv_blocks // world_size)  # one RAM shared by all ranks
    return model, num_kv_blocks, max_model_len


def _plain_linears(model) -> None:
    """Undo the CPU linears (engine/cpu_linear.py) that loading on the host put in: on the GPU they would
    keep their host-side weight copies."""
    for module in model.modules():
        if isinstance(module, SkinnyLinear):
            module.weight_t = None
            module.__class__ = torch.nn.Linear


def build_runner(job: RankJob, model, num_kv_blocks: int, max_model_len: int) -> ModelRunner:
    """Join the process group and build the rank's runner; decode steps run eagerly on this path."""
    device = next(model.parameters()).device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=job.init_method,
                            rank=job.rank, world_size=job.config.tensor_parallel_size)
    eager = dataclasses.replace(job.config, enforce_eager=True, compile_decode=False)
    runner = ModelRunner(model, eager, num_kv_blocks, max_model_len)
    dist.barrier()
    return runner


def worker_main(job: RankJob, conn: multiprocessing.connection.Connection, parent_pid: int) -> None:
    """A worker process: load, agree on the KV cache with rank 0, then run steps until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=job.log_level, format=f"%(asctime)s %(levelname)s rank {job.rank} %(name)s: %(message)s")
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    model, num_kv_blocks, max_model_len = load_shard(job)
    conn.send(num_kv_blocks)
    runner = build_runner(job, model, conn.recv(), max_model_len)
    log.info("rank %d (pid %d) ready on %s", job.rank, os.getpid(), runner.device)
    serve_steps(runner, conn.recv_bytes)
    dist.destroy_process_group()


def _exit_with_parent(parent_pid: int) -> None:
    """Rank 0 is not our parent (the fork server is): poll it, in case it died without closing our pipe."""
    while True:
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            os._exit(1)
        time.sleep(0.5)


class WorkerRanks:
    """Ranks 1..N-1 as rank 0 sees them: their processes, the pipe to each, and whether one has failed."""

    def __init__(self, processes: list, conns: list) -> None:
        self.processes = processes
        self.conns = conns
        self.num_threads = torch.get_num_threads()  # rank 0 shares the cores while the workers live
        self.failure: str | None = None
        self.start_error: BaseException | None = None
        atexit.register(self.stop_workers)  # before multiprocessing's own exit hook, which would wait on them

    def start(self, their_ends: list) -> None:
        try:
            for process, there in zip(self.processes, their_ends):
                process.start()
                there.close()
        except BaseException as exc:  # re-raised by the loading thread
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


def start_tensor_parallel(path: str, config: EngineConfig, dtype: torch.dtype) -> tuple[TensorParallelRunner, int, int]:
    """Start ranks 1..N-1, load rank 0's shard here; returns (rank 0's runner, KV blocks, context length)
    once every rank is loaded and joined."""
    from transformers import AutoConfig

    world_size = config.tensor_parallel_size
    hf_config = AutoConfig.from_pretrained(path, trust_remote_code=config.trust_remote_code)
    if is_vision_language(hf_config):
        raise ValueError("tensor parallelism serves text models; serve this vision-language model with "
                         "--tensor-parallel-size 1")
    check_shardable(hf_config.get_text_config(), world_size)
    rank_device(config, 0)  # the device checks, before any process starts
    if config.compile_decode or (not config.enforce_eager and resolve_device(config.device).type == "cuda"):
        log.info("tensor parallel: decode steps run eagerly (no CUDA graphs or compiled CPU steps on this path yet)")
    # Workers fork from a fresh, single-threaded server process that has imported torch and transformers
    # once (safe to fork, unlike this threaded one); a second TP model in the same process starts fast.
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["transerve.parallel.ranks", "transformers.modeling_utils"])
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    log_level = logging.getLogger().getEffectiveLevel()
    pipes = [context.Pipe() for _ in range(1, world_size)]
    processes = [context.Process(target=worker_main, args=(RankJob(path, config, dtype, rank, init_method, log_level),
                                                           there, os.getpid()), daemon=True)
                 for rank, (_, there) in enumerate(pipes, start=1)]
    ranks = WorkerRanks(processes, [here for here, _ in pipes])
    # The fork server's start (it imports torch and transformers) overlaps rank 0's own loading.
    starting = threading.Thread(target=ranks.start, args=([there for _, there in pipes],), daemon=True)
    starting.start()
    try:
        job = RankJob(path, config, dtype, 0, init_method, log_level)
        model, num_kv_blocks, max_model_len = load_shard(job)
        starting.join()
        if ranks.start_error is not None:
            raise ranks.start_error
        num_kv_blocks = min(num_kv_blocks, *ranks.receive_all())
        for conn in ranks.conns:
            conn.send(num_kv_blocks)
        runner = build_runner(job, model, num_kv_blocks, max_model_len)
    except BaseException:
        ranks.close()
        raise
    log.info("tensor parallel: %d ranks on %s, %d KV blocks each (the smallest any rank can hold)", world_size,
             ", ".join(str(rank_device(config, r)) for r in range(world_size)), num_kv_blocks)
    return TensorParallelRunner(runner, ranks), num_kv_blocks, max_model_len


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
