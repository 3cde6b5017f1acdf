"""Tensor-parallel ranks: rank 0 is the server's own process; ranks 1..N-1 are child processes, one per
device, each loading its shard and then running every step rank 0 sends.

Two channels. Steps go from rank 0 to each worker over a pipe (pickled once, written N-1 times): a
worker waits on it without a timeout however long the server idles, and reads end-of-file the moment
rank 0 is gone. The forward's all-reduces go over torch.distributed (NCCL on CUDA, gloo on CPU),
joined only once every rank has loaded, so a rank that fails to load is reported instead of
leaving the others waiting in a rendezvous.

Start: every rank loads and cuts its shard, and reports how many KV blocks it can hold; rank 0 takes
the smallest, every rank builds its runner with it, and a barrier proves the group before the server
says ready. A worker ignores SIGINT and SIGTERM: rank 0 owns its life (parallel/workers.py) and stops it
when the server stops, and a worker whose rank 0 is gone exits by itself.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from transerve.config import EngineConfig
from transerve.engine.cpu_linear import SkinnyLinear
from transerve.engine.kv_sizing import choose_num_kv_blocks, context_length
from transerve.engine.model_runner import ModelRunner
from transerve.engine.models import load_model, resolve_device
from transerve.engine.multimodal import is_vision_language
from transerve.parallel.sharding import check_shardable, shard_model
from transerve.parallel.steps import TensorParallelRunner, serve_steps
from transerve.parallel.workers import WorkerRanks

log = logging.getLogger(__name__)


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
    # Load on the host, cut, then move only the shard to the device. Shards are cut from float linears, so a
    # GGUF runs dequantized here (config refuses an explicit int8).
    config = dataclasses.replace(config, quantization="none")
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
    eager = dataclasses.replace(job.config, enforce_eager=True)
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
    if not config.enforce_eager:
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
