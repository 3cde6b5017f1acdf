"""Decode steps as CUDA graphs, one per batch-size bucket.

`ModelRunner` captures them on CUDA (unless --enforce-eager) and replays one for every step that only
decodes, with no images to merge, at a batch size some bucket holds.

A replay skips the Python of the model's forward and its few hundred kernel launches, which for a
small model is most of a decode step. Buckets are padded up: padding rows write no KV (slot -1) and
attend to one key of block 0, and their logits are dropped. Everything a graph reads lives in static
buffers that `run` overwrites; our kernels pick their launch shapes from tensor shapes alone (no
device sync), which is what makes them capturable. Off CUDA the same code runs the closures eagerly,
so the padding logic is testable on CPU.
"""

from __future__ import annotations

import bisect
from typing import Callable

import numpy as np
import torch

from transerve.engine.attention import PagedBatch

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def bucket_sizes(buckets: tuple[int, ...], max_num_seqs: int) -> list[int]:
    """The buckets below max_num_seqs, and max_num_seqs itself as the last."""
    return sorted({b for b in buckets if b < max_num_seqs} | {max_num_seqs})


class DecodeGraphs:
    def __init__(self, model, kv_caches, write_kv: Callable, paged_attention: Callable, max_num_seqs: int,
                 max_blocks_per_seq: int, block_size: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS,
                 use_graphs: bool | None = None) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        self.buckets = bucket_sizes(buckets, max_num_seqs)
        n = self.buckets[-1]
        dev = self.device
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)  # one token each, always
        self.kv_caches, self.write_kv, self.paged_attention = kv_caches, write_kv, paged_attention
        self.block_size = block_size
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool = None

    def bucket(self, num_seqs: int) -> int | None:
        i = bisect.bisect_left(self.buckets, num_seqs)
        return self.buckets[i] if i < len(self.buckets) else None

    @torch.inference_mode()
    def _forward(self, bs: int) -> torch.Tensor:
        batch = PagedBatch(
            kv_caches=self.kv_caches, slot_mapping=self.slot_mapping[:bs], block_tables=self.block_tables[:bs],
            seq_lens=self.seq_lens[:bs], query_start_loc=self.query_start_loc[: bs + 1],
            write_kv=self.write_kv, paged_attention=self.paged_attention,
        )
        out = self.model(input_ids=self.input_ids[None, :bs], position_ids=self.positions[None, :bs],
                         logits_to_keep=0, use_cache=False, paged_batch=batch)
        return out.logits[0].float()

    def capture(self) -> None:
        """Capture every bucket, largest first so the smaller ones reuse its memory pool."""
        if not self.use_graphs:
            return
        self._pad_from(0)
        for bs in reversed(self.buckets):
            for _ in range(2):  # warm up: Triton compiles, cuBLAS picks its kernels, outside the capture
                self._forward(bs)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.logits[bs] = self._forward(bs)
            self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)

    def _pad_from(self, n: int) -> None:
        self.input_ids[n:] = 0
        self.positions[n:] = 0
        self.slot_mapping[n:] = -1  # write nothing
        self.seq_lens[n:] = 1  # attend to one (stale) key: finite, and dropped
        self.block_tables[n:] = 0

    @torch.inference_mode()
    def run(self, input_ids: list[int], positions: list[int], slots: list[int], block_tables: np.ndarray,
            seq_lens: list[int]) -> torch.Tensor:  # [num_seqs, vocab_size] float32
        n = len(input_ids)
        bs = self.bucket(n)
        assert bs is not None and len(positions) == len(slots) == len(block_tables) == len(seq_lens) == n
        width = block_tables.shape[1]
        tables = torch.from_numpy(block_tables)
        # Stage everything in one pinned buffer: one host-to-device copy per step instead of five.
        staged = torch.from_numpy(np.array(input_ids + positions + slots + seq_lens, dtype=np.int64))
        staged = staged.pin_memory() if self.device.type == "cuda" else staged
        staged = staged.to(self.device, non_blocking=True)
        self.input_ids[:n].copy_(staged[:n])
        self.positions[:n].copy_(staged[n : 2 * n])
        self.slot_mapping[:n].copy_(staged[2 * n : 3 * n])
        self.seq_lens[:n].copy_(staged[3 * n :])
        self.block_tables[:n, :width].copy_(tables, non_blocking=True)
        self._pad_from(n)
        if bs in self.graphs:
            self.graphs[bs].replay()
            return self.logits[bs][:n]
        return self._forward(bs)[:n]

