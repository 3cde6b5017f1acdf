"""How big the paged KV cache is: its block shape, bytes per block, and how many blocks fit."""

from __future__ import annotations

import math
import mmap
from typing import Callable

import torch

from transerve.config import EngineConfig

CPU_KV_CACHE_CAP_BYTES = 4 * 1024**3


def kv_shape(text_config) -> tuple[int, int]:
    """(KV heads, head dim) of a decoder's attention."""
    num_heads = text_config.num_attention_heads
    num_kv_heads = getattr(text_config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // num_heads
    return num_kv_heads, head_dim


def context_length(text_config, config: EngineConfig) -> int:
    """The longest sequence served: the model's own context, or --max-model-len when shorter."""
    max_model_len = getattr(text_config, "max_position_embeddings", None) or 4096
    if config.scheduler.max_model_len is not None:
        max_model_len = min(max_model_len, config.scheduler.max_model_len)
    return max_model_len


def kv_cache_dtype(config: EngineConfig, weights_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's dtype: --kv-cache-dtype, or the weights' dtype. Another dtype than the weights' is
    for CPU only: the reference kernels cast what they read, the Triton kernels expect one dtype."""
    if config.cache.kv_cache_dtype == "auto":
        return weights_dtype
    dtype = getattr(torch, config.cache.kv_cache_dtype)
    if device.type != "cpu" and dtype != weights_dtype:
        raise ValueError(f"--kv-cache-dtype {config.cache.kv_cache_dtype} differs from the weights' {weights_dtype}: "
                         f"only the CPU supports that; leave it auto on {device.type}")
    return dtype


def kv_bytes_per_block(model, block_size: int, kv_dtype: torch.dtype | None = None) -> int:
    text_config = model.config.get_text_config()
    num_kv_heads, head_dim = kv_shape(text_config)
    element_size = (kv_dtype or next(model.parameters()).dtype).itemsize
    return 2 * text_config.num_hidden_layers * block_size * num_kv_heads * head_dim * element_size


def allocate_kv_caches(num_layers: int, shape: tuple[int, ...], dtype: torch.dtype,
                       device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed (key, value) caches per layer. On CPU each is an anonymous memory map: zero pages the OS
    commits on first write, so an idle server holds only the KV it has used, instead of every byte of a
    cache sized for the busiest hour (malloc'd memory may be recycled and written at allocation)."""
    if device.type != "cpu":
        return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                for _ in range(num_layers)]
    nbytes = math.prod(shape) * dtype.itemsize

    def zeros() -> torch.Tensor:
        # The tensor keeps the map alive; torch warns that the buffer is not writable only for read-only maps.
        return torch.frombuffer(mmap.mmap(-1, max(nbytes, 1)), dtype=dtype, count=math.prod(shape)).view(shape)

    return [(zeros(), zeros()) for _ in range(num_layers)]


def choose_num_kv_blocks(model, config: EngineConfig, max_model_len: int) -> int:
    """--num-kv-blocks if given; else a fraction of free device memory (on CPU, of available RAM,
    capped so an idle server does not reserve the machine), never more than max_num_seqs full contexts."""
    if config.cache.num_kv_blocks is not None:
        return config.cache.num_kv_blocks
    device = next(model.parameters()).device
    per_block = kv_bytes_per_block(model, config.cache.block_size, kv_cache_dtype(config, next(model.parameters()).dtype, device))
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        # Leave (1 - fraction) of the card, plus room for activations, for everything else.
        budget = free - (1.0 - config.cache.memory_fraction) * total - 2 * 1024**3
    else:
        budget = min(available_ram() * config.cache.memory_fraction * 0.5, CPU_KV_CACHE_CAP_BYTES)
    most_useful = config.scheduler.max_num_seqs * -(-max_model_len // config.cache.block_size)
    num_blocks = min(int(budget // per_block), most_useful)
    if num_blocks < 1:
        raise RuntimeError("no memory left for the KV cache: lower --max-model-len or free device memory")
    return num_blocks


def kv_blocks_for_memory(model, block_size: int, memory_fraction: float, profile: Callable[[], None],
                         device: torch.device) -> int:
    """KV blocks that fit in `memory_fraction` of the device's total memory, after the model, the
    activation peak of `profile()` (run the largest step the scheduler allows: max_num_batched_tokens
    of prefill, then sampling max_num_seqs rows) and whatever other processes hold.

    This is vLLM's --gpu-memory-utilization: the fraction of the whole card this engine may use."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    profile()
    torch.cuda.synchronize(device)
    activations = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info(device)
    used_elsewhere_and_model = total - free  # includes our weights and the CUDA context
    graphs_reserve = 256 << 20  # decode graphs' pools: small next to the prefill peak
    budget = int(total * memory_fraction) - used_elsewhere_and_model - activations - graphs_reserve
    if budget <= 0:
        raise RuntimeError(f"no memory left for the KV cache at memory fraction {memory_fraction}: "
                           f"{used_elsewhere_and_model >> 20} MiB in use, {activations >> 20} MiB activation peak")
    return budget // kv_bytes_per_block(model, block_size)


def available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 1024**3
