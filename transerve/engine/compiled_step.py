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

Each bucket is compiled ahead of time (dynamo's `aot_compile`: the traced graph, inductor's C++ and the
guards on tensor shapes, without the model's weights, which are inputs) and saved under `artifacts`, a
directory named for everything the graph depends on (`artifacts_dir`). A later start loads the saved
steps in about a second each, with no tracing; a server compiles the missing ones in a child process
(actors/background_compile.py) and serves eagerly until each is ready. A compile's dummy step reads and
writes one KV block that no request holds (`scratch_block`). If compiling fails, one line is logged and
every step runs eagerly: a model that the compiler rejects is still served.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from transerve.engine.attention import PagedBatch
from transerve.engine.cuda_graphs import DEFAULT_BUCKETS, bucket_sizes

log = logging.getLogger(__name__)

# Compiling pays for small batches only. Measured on a 2-core AVX2 EPYC (SmolLM2-135M, float32, one
# thread, shared box): batch 32 440 ms compiled vs 330 ms eager, where the compiled K/V gather is slower than
# the eager index_select. With its GGUF's weights on a 2-core Xeon (bench/profile_step.py --batch 8
# --quantization gguf): batch 8 49 ms compiled vs 77 ms eager. Larger batches run eagerly.
MAX_COMPILED_BATCH = 8


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


def artifacts_dir(model, kv_caches, max_blocks_per_seq: int, buckets: list[int]) -> Path:
    """Where a model's compiled steps are saved: a directory named for what the graphs depend on (the model's
    modules and config, the KV cache's and block table's shapes, the buckets, the code and the libraries),
    never for the weights' values, which the steps take as inputs."""
    import transformers

    sources = [Path(__file__).with_name(name) for name in ("compiled_step.py", "attention.py", "quantized.py", "block_kernels.py")]
    key = [repr(model), model.config.to_json_string(), str(kv_caches[0][0].shape), str(kv_caches[0][0].dtype),
           len(kv_caches), max_blocks_per_seq, buckets, torch.__version__, transformers.__version__,
           torch.backends.cpu.get_cpu_capability(), *(p.read_text() for p in sources)]
    digest = hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()[:20]
    return inductor_cache_dir().parent / "decode-steps" / digest


class CompiledDecode:
    """`bucket(n)` and `run(...)` as DecodeGraphs, over the buckets compiled or loaded so far; `run` returns
    None for a step its compiled bucket cannot take (the eager step runs it). Batches above `max_batch` have
    no bucket: they run eagerly."""

    def __init__(self, model, kv_caches, max_num_seqs: int, max_blocks_per_seq: int, block_size: int,
                 scratch_block: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS, max_batch: int | None = None,
                 artifacts: Path | None = None) -> None:
        self.model, self.kv_caches, self.block_size, self.scratch_block = model, kv_caches, block_size, scratch_block
        self.buckets = [b for b in bucket_sizes(buckets, max_num_seqs) if b <= (max_batch or MAX_COMPILED_BATCH)]
        self.artifacts = artifacts or artifacts_dir(model, kv_caches, max_blocks_per_seq, self.buckets)
        n = max(self.buckets, default=1)
        self.input_ids = torch.zeros(n, dtype=torch.int64)
        self.positions = torch.zeros(n, dtype=torch.int64)
        self.slot_mapping = torch.zeros(n, dtype=torch.int64)
        self.src_row = torch.arange(n, dtype=torch.int64)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32)
        self.seq_lens = torch.ones(n, dtype=torch.int32)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32)
        self.ctx_pos = torch.arange(max_blocks_per_seq * block_size, dtype=torch.int64)
        self.steps: dict[int, Callable] = {}  # bucket -> its compiled step, ready to run
        self.steps_run = 0  # decode steps that ran compiled
        self.guard_failure_logged = False
        self.failed = False
        use_transerve_cache()
        # dynamic=False: the batch stays static per bucket; only ctx_pos is marked dynamic.
        self.forward = torch.compile(_decode_forward, dynamic=False, fullgraph=True,
                                     options={"cpp_wrapper": True, "guard_filter_fn": _shape_and_global_guards})

    def bucket(self, num_seqs: int) -> int | None:
        """The smallest ready bucket that holds `num_seqs` sequences, if any."""
        if self.failed:
            return None
        return next((b for b in self.buckets if b >= num_seqs and b in self.steps), None)

    def missing(self) -> list[int]:
        return [b for b in self.buckets if b not in self.steps]

    def load_saved(self) -> list[int]:
        """Load the buckets saved under `artifacts`; returns those loaded."""
        from torch._dynamo.aot_compile import AOTCompiledFunction

        loaded = []
        for bs in self.missing():
            path = self.artifacts / f"batch-{bs}.bin"
            if not path.exists():
                continue
            try:
                self.steps[bs] = _unguarded(AOTCompiledFunction.deserialize(path.read_bytes()))
            except Exception as exc:  # noqa: BLE001 - a stale or partial file: compiled again instead
                log.warning("could not load the compiled decode step %s (%s); it compiles again", path, exc)
                path.unlink(missing_ok=True)
                continue
            loaded.append(bs)
        return loaded

    @torch.inference_mode()
    def compile_buckets(self) -> None:
        """Compile and save every missing bucket, smallest first, each from a dummy decode step: one token per
        row at position block_size - 1 of the scratch block."""
        self.artifacts.mkdir(parents=True, exist_ok=True)
        length = self.block_size  # > 1: dynamo specializes context lengths 0 and 1
        for bs in self.missing():
            # Through run's own buffers, so the compiled step sees its inputs exactly as run passes them.
            args = self._inputs(bs, [0] * bs, [length - 1] * bs, [self.scratch_block * self.block_size + length - 1] * bs,
                                np.full((bs, 1), self.scratch_block, dtype=np.int32), [length] * bs)
            torch._dynamo.maybe_mark_dynamic(args[-1], 0)
            log.info("compiling the decode step for batch size %d...", bs)
            start = time.perf_counter()
            try:
                step = self.forward.aot_compile((args, {}))
                step.save_compiled_function(str(self.artifacts / f"batch-{bs}.bin"))
            except Exception as exc:  # noqa: BLE001 - never refuse to serve: the eager step computes the same
                log.warning("compiling the decode step failed; running eagerly (%s: %s)", type(exc).__name__,
                            str(exc).splitlines()[0] if str(exc) else "")
                self.failed = True
                return
            self.steps[bs] = _unguarded(step)
            log.info("compiled the decode step for batch size %d in %.1f s", bs, time.perf_counter() - start)

    @torch.inference_mode()
    def run(self, input_ids: list[int], positions: list[int], slots: list[int], block_tables: np.ndarray,
            seq_lens: list[int]) -> torch.Tensor | None:  # [num_seqs, vocab_size] float32
        n = len(input_ids)
        bs = self.bucket(n)
        assert bs is not None
        args = self._inputs(bs, input_ids, positions, slots, block_tables, seq_lens)
        step = self.steps[bs]
        # A context the graph's shape guards exclude (inductor's CPU code may bound the length, e.g.
        # `<= 4096` for its reduction helper) runs eagerly.
        if not step.guard_check(*args):
            if not self.guard_failure_logged:
                reason = step._artifacts.guard_manager.check_verbose(step.prepare_f_locals(*args)).verbose_code_parts
                log.info("a decode step of batch size %d ran eagerly: its compiled step's guards failed (%s)", n, reason)
                self.guard_failure_logged = True
            return None
        self.steps_run += 1
        return step(*args)[:n]

    def _inputs(self, bs: int, input_ids: list[int], positions: list[int], slots: list[int], block_tables: np.ndarray,
                seq_lens: list[int]) -> tuple:
        """The step's arguments for bucket `bs`, in the static buffers, the batch padded with its last row."""
        n, width, pad = len(input_ids), block_tables.shape[1], bs - len(input_ids)
        self.input_ids[:bs] = torch.tensor(input_ids + input_ids[-1:] * pad)
        self.positions[:bs] = torch.tensor(positions + positions[-1:] * pad)
        self.slot_mapping[:bs] = torch.tensor(slots + slots[-1:] * pad)
        self.src_row[n:bs] = n - 1
        self.src_row[:n] = torch.arange(n)
        self.seq_lens[:bs] = torch.tensor(seq_lens + seq_lens[-1:] * pad)
        self.block_tables[:n, :width] = torch.from_numpy(block_tables)
        self.block_tables[n:bs] = self.block_tables[n - 1]
        return (self.model, self.kv_caches, self.input_ids[:bs], self.positions[:bs], self.slot_mapping[:bs],
                self.src_row[:bs], self.block_tables[:bs], self.seq_lens[:bs], self.query_start_loc[: bs + 1],
                self.ctx_pos[: max(seq_lens)])


def _shape_and_global_guards(guard_entries) -> list[bool]:
    """The guards a step keeps: the symbolic shapes' (the context length's range) and global state's. The
    model, the KV cache and the static buffers are fixed for the runner's life, and per-tensor guards also
    compare how each input was made (dispatch keys), which differed between the compiling child and the server."""
    return [g.guard_type in ("SHAPE_ENV", "GLOBAL_STATE") for g in guard_entries]


def _unguarded(step):
    """`run` checks a step's guards itself, once, and runs the step eagerly where they fail."""
    step.disable_guard_check()
    return step
