"""Attention over the paged KV cache for a packed batch of prefill chunks and decodes.

One program per (query block, KV head[, KV split]). A query block is up to BLOCK_Q consecutive query
tokens of one sequence times the GROUP query heads that share the KV head, laid out as BLOCK_M rows
(row r = token r // GROUP, head r % GROUP), so each K/V tile is loaded once for the whole GQA group
and feeds tensor-core dots even for a single decode token. The cache is walked in TILE-key tiles
whose rows are gathered through the block table, so TILE is independent of the cache block size.

Decode-only batches with few (sequence, KV head) pairs for the card also split the context into
NUM_SPLITS ranges (flash-decoding): each program keeps its own softmax statistics and a second kernel
merges them. The launcher picks the split count from the shapes alone (no device sync), so the call
can be captured in a CUDA graph. `paged_attention_ref` in reference.py is the oracle.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, FP32: tl.constexpr):
    if FP32:  # fp32 inputs (no TF32 rounding), or bf16 under the interpreter, whose bf16 dot is broken
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


# The batch size and the block-table width change every step: don't compile a variant per divisibility.
@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])
def _paged_attention_kernel(
    query_ptr,  # [num_tokens, num_heads, head_dim], any strides
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,  # same shape and strides as k_cache
    block_tables_ptr,  # [num_seqs, max_blocks] int32
    seq_lens_ptr,  # [num_seqs] int32: cached tokens after this step, new ones included
    query_start_loc_ptr,  # [num_seqs + 1] int32
    out_ptr,  # [num_tokens, num_heads, head_dim]: written when NUM_SPLITS == 1
    part_out_ptr,  # [num_tokens, num_heads, NUM_SPLITS, HEAD_DIM_P2] fp32: unnormalised partial outputs
    part_ml_ptr,  # [num_tokens, num_heads, NUM_SPLITS, 2] fp32: partial running max (log2) and sum
    num_seqs, head_dim, scale_log2, sliding_window,
    stride_qt, stride_qh, stride_qd,
    stride_cb, stride_cs, stride_ch, stride_cd,
    stride_bt,
    stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DECODE_ONLY: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    if DECODE_ONLY:  # one token per sequence: program i is sequence i, no search
        seq = q_block
    else:
        # Sequence i owns query blocks [start(i), start(i + 1)), start(i) = qsl[i] // BLOCK_Q + i:
        # the "+ i" leaves room for each sequence's partial last block. Binary search for the owner.
        lo = tl.full([], 0, tl.int32)
        hi = tl.full([], 0, tl.int32) + num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            start = tl.load(query_start_loc_ptr + mid)
            if BLOCK_Q > 1:
                start = start // BLOCK_Q + mid
            if start <= q_block:
                lo = mid + 1
            else:
                hi = mid
        seq = lo - 1
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if DECODE_ONLY:
        local = 0
    elif BLOCK_Q > 1:
        local = q_block - (q_start // BLOCK_Q + seq)
    else:
        local = q_block - q_start
    if local * BLOCK_Q >= q_len:  # the spare block at a sequence's end, or past the last one
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len  # position of the sequence's first query token

    rows = tl.arange(0, BLOCK_M)
    q_tok = local * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < BLOCK_Q * GROUP) & (q_tok < q_len)
    d = tl.arange(0, HEAD_DIM_P2)
    d_ok = d < head_dim
    token = (q_start + q_tok).to(tl.int64)
    q = tl.load(
        query_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )
    q_pos = context + q_tok

    # Keys this block can see: causal up to its last query, and the window behind its first one.
    k_end = context + tl.minimum(q_len, (local + 1) * BLOCK_Q)
    tile_lo = 0
    if USE_WINDOW:
        tile_lo = tl.maximum(context + local * BLOCK_Q - sliding_window + 1, 0) // TILE
    tile_hi = tl.cdiv(k_end, TILE)
    if NUM_SPLITS > 1:  # split this sequence's tiles evenly, so short contexts don't idle splits
        per_split = tl.cdiv(tile_hi - tile_lo, NUM_SPLITS)
        tile_lo = tile_lo + split * per_split
        tile_hi = tl.minimum(tile_hi, tile_lo + per_split)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P2], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    head_off = kv_head.to(tl.int64) * stride_ch
    for t in range(tile_lo, tile_hi):
        k_pos = t * TILE + tl.arange(0, TILE)
        k_ok = k_pos < k_end
        block = tl.load(table + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
        kv_off = block * stride_cb + (k_pos % BLOCK_SIZE) * stride_cs + head_off
        k = tl.load(k_cache_ptr + kv_off[None, :] + d[:, None] * stride_cd, mask=k_ok[None, :] & d_ok[:, None], other=0.0)
        s = _dot(q, k, DOT_FP32) * scale_log2
        allowed = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            allowed = allowed & (k_pos[None, :] > q_pos[:, None] - sliding_window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        # Masked rows must read zeros, not the cache's stale (possibly NaN) slots: 0 * NaN is NaN.
        v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :] * stride_cd, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_FP32)
        m_i = m_new

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :] * stride_od,
            out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :],
        )
    else:
        part = (token * (GROUP * tl.num_programs(1)) + head) * NUM_SPLITS + split  # [BLOCK_M]
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM_P2 + d[None, :], acc, mask=row_ok[:, None])
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    part_out_ptr,  # [num_tokens, num_heads, NUM_SPLITS, HEAD_DIM_P2] fp32
    part_ml_ptr,  # [num_tokens, num_heads, NUM_SPLITS, 2] fp32
    out_ptr,  # [num_tokens, num_heads, head_dim]
    head_dim,
    stride_ot, stride_oh, stride_od,
    NUM_SPLITS: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    base = (token * tl.num_programs(1) + head) * NUM_SPLITS
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, HEAD_DIM_P2)
    m = tl.load(part_ml_ptr + (base + s) * 2)
    l = tl.load(part_ml_ptr + (base + s) * 2 + 1)
    m_max = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))  # empty splits weigh nothing
    acc = tl.load(part_out_ptr + (base + s)[:, None] * HEAD_DIM_P2 + d[None, :])
    out = tl.sum(acc * w[:, None], 0) / tl.sum(w * l, 0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + d * stride_od, out.to(out_ptr.dtype.element_ty), mask=d < head_dim)


_INTERPRETED = type(_paged_attention_kernel).__name__ == "InterpretedFunction"


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: any small number keeps the heuristic exercised


def choose_num_splits(num_seqs: int, num_tokens: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Split only decode-only batches whose (sequence, KV head) programs can't fill the card, and only
    as far as each split keeps at least 512 keys of work. Shapes only: safe inside a CUDA graph."""
    if num_tokens != num_seqs:
        return 1
    programs = num_seqs * num_kv_heads
    wanted = triton.cdiv(4 * _num_sms(device), programs)
    splits = 1
    while splits < 16 and splits < wanted and (splits * 2) * 512 <= max_context:
        splits *= 2
    return splits


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], any strides
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]: written in place when given
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    return launch(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window, out)


def launch(query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, sliding_window=None, out=None,
           *, num_splits: int | None = None, tile: int | None = None, num_warps: int | None = None,
           num_stages: int | None = None) -> torch.Tensor:
    """`paged_attention` with its tuning knobs exposed (for tests and bench/kernels.py)."""
    num_tokens, num_heads, head_dim = query.shape
    num_blocks, block_size, num_kv_heads, cache_head_dim = k_cache.shape
    num_seqs = seq_lens.shape[0]
    assert cache_head_dim == head_dim and num_heads % num_kv_heads == 0, (query.shape, k_cache.shape)
    assert v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride()
    assert query.dtype == k_cache.dtype == v_cache.dtype, (query.dtype, k_cache.dtype)
    assert query.dtype in (torch.float16, torch.bfloat16, torch.float32)
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_seqs and block_tables.stride(1) == 1
    assert block_tables.dtype == torch.int32 and seq_lens.dtype == torch.int32 and query_start_loc.dtype == torch.int32
    assert query_start_loc.shape == (num_seqs + 1,) and query_start_loc.is_contiguous() and seq_lens.is_contiguous()
    assert num_tokens >= num_seqs, "every sequence brings at least one query token"
    assert block_size & (block_size - 1) == 0, "block sizes are powers of two"
    if out is None:
        out = torch.empty(num_tokens, num_heads, head_dim, dtype=query.dtype, device=query.device)
    assert out.shape == query.shape and out.dtype == query.dtype
    if num_tokens == 0:
        return out

    group = num_heads // num_kv_heads
    decode_only = num_tokens == num_seqs
    # Decodes: one token, the GQA group padded to the 16 rows a tensor-core dot needs. Prefill: as many
    # tokens of the group as fit 64 rows, so K/V tiles are reused across queries too.
    block_m = max(16 if decode_only else 64, triton.next_power_of_2(group))
    block_q = 1 if decode_only else block_m // group
    head_dim_p2 = max(16, triton.next_power_of_2(head_dim))
    tile = tile or max(block_size, 64 if head_dim_p2 <= 128 else 32)
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_tokens, num_kv_heads, block_tables.shape[1] * block_size, query.device)
    assert num_splits >= 1 and num_splits & (num_splits - 1) == 0
    num_q_blocks = num_tokens if block_q == 1 else num_tokens // block_q + num_seqs
    if num_splits > 1:
        part_out = torch.empty(num_tokens, num_heads, num_splits, head_dim_p2, dtype=torch.float32, device=query.device)
        part_ml = torch.empty(num_tokens, num_heads, num_splits, 2, dtype=torch.float32, device=query.device)
    else:
        part_out = part_ml = out  # unused
    _paged_attention_kernel[(num_q_blocks, num_kv_heads, num_splits)](
        query, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, part_out, part_ml,
        num_seqs, head_dim, scale * _LOG2E, sliding_window or 0,
        *query.stride(), *k_cache.stride(), block_tables.stride(0), *out.stride(),
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, TILE=tile, BLOCK_SIZE=block_size,
        HEAD_DIM_P2=head_dim_p2, NUM_SPLITS=num_splits, DECODE_ONLY=decode_only,
        USE_WINDOW=sliding_window is not None and sliding_window > 0,
        DOT_FP32=query.dtype == torch.float32 or (_INTERPRETED and query.dtype == torch.bfloat16),
        num_warps=num_warps or (4 if block_m <= 64 else 8), num_stages=num_stages or 3,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_heads)](
            part_out, part_ml, out, head_dim, *out.stride(),
            NUM_SPLITS=num_splits, HEAD_DIM_P2=head_dim_p2, num_warps=1 if head_dim_p2 <= 64 else 2,
        )
    return out


def precompile(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
               device: torch.device, sliding_window: int | None = None) -> None:
    """Compile every variant a serving loop can hit (mixed batches, decodes with each split count), so
    no step stalls on the Triton compiler mid-run."""
    blocks = 2
    k_cache = torch.zeros(blocks + 1, block_size, num_kv_heads, head_dim, dtype=dtype, device=device)
    tables = torch.tensor([[1, 2]], dtype=torch.int32, device=device)
    seq_lens = torch.tensor([block_size + 1], dtype=torch.int32, device=device)
    for q_len in (1, 2):
        query = torch.zeros(q_len, num_heads, head_dim, dtype=dtype, device=device)
        qsl = torch.tensor([0, q_len], dtype=torch.int32, device=device)
        for num_splits in ((1, 2, 4, 8, 16) if q_len == 1 else (1,)):
            launch(query, k_cache, k_cache, tables, seq_lens, qsl, 1.0, sliding_window, num_splits=num_splits)
