"""Decode steps on CPU as one compiled graph per batch-size bucket (torch.compile, inductor's C++ backend).

The CPU sibling of DecodeGraphs (engine/cuda_graphs.py): the same buckets, static buffers and padding,
but instead of capturing a CUDA graph, the whole decode forward (the stock HF model, with a decode-only
paged attention written to trace without graph breaks) is compiled into a few fused C++/OpenMP kernels
around the GEMMs, instead of hundreds of eager ops and their Python.

Shapes: the batch is static per bucket (one compile each); the context length, which grows every step,
is the one dynamic dimension (`ctx_pos`), so a bucket never recompiles as sequences grow. The per-step
plan that the eager reference builds in Python (engine/kernels/reference.py `_plan`) is computed inside
the graph from `block_tables`, `seq_lens` and `ctx_pos`. Padding rows repeat the last real row: they
write that row's K/V to its slot (the same bytes, so duplicate writes are harmless) and their logits
are dropped.

Compiled code is cached on disk by inductor (TORCHINDUCTOR_CACHE_DIR, by default under
~/.cache/transerve/inductor), so a second start skips the C++ compile. If compiling fails, the step
logs one line and every later step runs eagerly: a model that the compiler rejects is still served.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from transerve.engine.attention import PagedBatch
from transerve.engine.cuda_graphs import DEFAULT_BUCKETS, bucket_sizes

log = logging.getLogger(__name__)

# Compiling pays for small batches only. Measured on a 2-core AVX2 EPYC (SmolLM2-135M, float32, one
# thread, shared box): batch 1 61 ms compiled vs 75 ms eager a step; batch 32 440 ms vs 330 ms, where
# the compiled K/V gather is slower than the eager index_select. Larger batches run eagerly.
MAX_COMPILED_BATCH = 4


def inductor_cache_dir() -> Path:
    root = Path(os.environ.get("TRANSERVE_CACHE", Path.home() / ".cache" / "transerve"))
    return root / "inductor"


def use_transerve_cache() -> None:
    """Point inductor's on-disk caches under ours, unless the user chose a directory. (Inductor may
    already have written its default into the environment when torch was imported.)"""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir()) == default_cache_dir():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(inductor_cache_dir())


def _write_kv(key, value, k_cache, v_cache, slot_mapping, src_row):
    """Padding rows repeat the last real row's slot and, through `src_row`, its K/V."""
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    k_cache.view(num_blocks * block_size, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key[src_row].to(k_cache.dtype))
    v_cache.view(num_blocks * block_size, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value[src_row].to(v_cache.dtype))


def _attend(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window, ctx_pos):
    """paged_attention_ref's decode path (`_attend_decodes`) with its plan built in the graph: one query
    per sequence over positions `ctx_pos` (0..ctx_len-1) of its context. [num_seqs, num_heads, head_dim]"""
    if sliding_window is not None:
        raise NotImplementedError("compiled decode steps do not support sliding-window attention")
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    num_seqs, num_heads, _ = query.shape
    heads_per_kv = num_heads // num_kv_heads
    inside = ctx_pos[None, :] < seq_lens[:, None].long()  # [num_seqs, ctx_len]
    pos = torch.where(inside, ctx_pos[None, :], 0)  # past the end: position 0, finite and masked
    slots = block_tables.long().gather(1, pos // block_size) * block_size + pos % block_size
    head_slots = slots[:, None, :] * num_kv_heads + torch.arange(num_kv_heads, device=slots.device)[None, :, None]
    ctx_len = ctx_pos.shape[0]
    keys = k_cache.view(-1, head_dim)[head_slots.reshape(-1)].view(num_seqs * num_kv_heads, ctx_len, head_dim).to(query.dtype)
    values = v_cache.view(-1, head_dim)[head_slots.reshape(-1)].view(num_seqs * num_kv_heads, ctx_len, head_dim).to(query.dtype)
    bias = torch.where(inside, 0.0, float("-inf")).to(query.dtype)[:, None, None, :]
    bias = bias.expand(num_seqs, num_kv_heads, heads_per_kv, ctx_len).reshape(num_seqs * num_kv_heads, heads_per_kv, ctx_len)
    grouped = query.reshape(num_seqs * num_kv_heads, heads_per_kv, head_dim)
    scores = torch.baddbmm(bias, grouped, keys.transpose(1, 2), alpha=scale)
    return torch.bmm(scores.softmax(dim=-1), values).view(num_seqs, num_heads, head_dim)


def _decode_forward(model, kv_caches, input_ids, positions, slot_mapping, src_row, block_tables, seq_lens,
                    query_start_loc, ctx_pos):
    batch = PagedBatch(
        kv_caches=kv_caches, slot_mapping=slot_mapping, block_tables=block_tables, seq_lens=seq_lens,
        query_start_loc=query_start_loc, write_kv=functools.partial(_write_kv, src_row=src_row),
        paged_attention=functools.partial(_attend, ctx_pos=ctx_pos),
    )
    out = model(input_ids=input_ids[None], position_ids=positions[None], logits_to_keep=0, use_cache=False, paged_batch=batch)
    return out.logits[0].float()


class CompiledDecode:
    """`bucket(n)` and `run(...)` as DecodeGraphs; `run` returns None once compiling has failed. Batches
    above `max_batch` have no bucket: they run eagerly."""

    def __init__(self, model, kv_caches, max_num_seqs: int, max_blocks_per_seq: int, block_size: int,
                 buckets: tuple[int, ...] = DEFAULT_BUCKETS, max_batch: int = MAX_COMPILED_BATCH) -> None:
        self.model, self.kv_caches, self.block_size = model, kv_caches, block_size
        self.buckets = [b for b in bucket_sizes(buckets, max_num_seqs) if b <= max_batch]
        n = max(self.buckets, default=1)
        self.input_ids = torch.zeros(n, dtype=torch.int64)
        self.positions = torch.zeros(n, dtype=torch.int64)
        self.slot_mapping = torch.zeros(n, dtype=torch.int64)
        self.src_row = torch.arange(n, dtype=torch.int64)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32)
        self.seq_lens = torch.ones(n, dtype=torch.int32)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32)
        self.ctx_pos = torch.arange(max_blocks_per_seq * block_size, dtype=torch.int64)
        self.compiled = set()  # buckets already compiled in this process
        self.failed = False
        use_transerve_cache()
        # dynamic=False: the batch stays static per bucket; only ctx_pos is marked dynamic.
        self.forward = torch.compile(_decode_forward, dynamic=False, fullgraph=True, options={"cpp_wrapper": True})

    def bucket(self, num_seqs: int) -> int | None:
        if self.failed or not self.buckets:
            return None
        i = next((i for i, b in enumerate(self.buckets) if b >= num_seqs), None)
        return None if i is None else self.buckets[i]

    @torch.inference_mode()
    def run(self, input_ids: list[int], positions: list[int], slots: list[int], block_tables: np.ndarray,
            seq_lens: list[int]) -> torch.Tensor | None:  # [num_seqs, vocab_size] float32
        n = len(input_ids)
        bs = self.bucket(n)
        assert bs is not None
        width = block_tables.shape[1]
        pad = bs - n
        self.input_ids[:bs] = torch.tensor(input_ids + input_ids[-1:] * pad)
        self.positions[:bs] = torch.tensor(positions + positions[-1:] * pad)
        self.slot_mapping[:bs] = torch.tensor(slots + slots[-1:] * pad)
        self.src_row[n:bs] = n - 1
        self.src_row[:n] = torch.arange(n)
        self.seq_lens[:bs] = torch.tensor(seq_lens + seq_lens[-1:] * pad)
        self.block_tables[:n, :width] = torch.from_numpy(block_tables)
        self.block_tables[n:bs] = self.block_tables[n - 1]
        ctx_pos = self.ctx_pos[: max(seq_lens)]
        # maybe_: inductor's CPU codegen may guard the length (e.g. `<= 4096` for its reduction helper) and a
        # strict mark_dynamic turns that guard into a failed compile; a longer context then compiles once more.
        torch._dynamo.maybe_mark_dynamic(ctx_pos, 0)
        args = (self.model, self.kv_caches, self.input_ids[:bs], self.positions[:bs], self.slot_mapping[:bs],
                self.src_row[:bs], self.block_tables[:bs], self.seq_lens[:bs], self.query_start_loc[: bs + 1], ctx_pos)
        if bs in self.compiled:
            return self.forward(*args)[:n]
        log.info("compiling the decode step for batch size %d (cached on disk for later starts)...", bs)
        start = time.perf_counter()
        try:
            with torch._dynamo.config.patch(recompile_limit=max(64, 2 * len(self.buckets))):
                logits = self.forward(*args)[:n]
        except Exception as exc:  # never refuse to serve: the eager step computes the same thing
            log.warning("compiling the decode step failed; running eagerly (%s: %s)", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            self.failed = True
            return None
        self.compiled.add(bs)
        log.info("compiled the decode step for batch size %d in %.1f s", bs, time.perf_counter() - start)
        return logits
