"""Constrained decoding's mask, on the device: one program per (masked row, block of the vocabulary) sets
the logits of the tokens whose bit is clear to -inf, in place, right before the sampling kernel."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _apply_token_bitmask_kernel(
    logits_ptr,  # [num_seqs, vocab] fp32, unit column stride
    bitmask_ptr,  # [num_masked, words] int32, contiguous
    rows_ptr,  # [num_masked] int64: the logits row each bitmask row masks
    vocab, words, stride_l,
    BLOCK_V: tl.constexpr,
):
    k = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    in_vocab = offs < vocab
    row = tl.load(rows_ptr + k)
    word = tl.load(bitmask_ptr + k * words + offs // 32, mask=in_vocab & (offs // 32 < words), other=0)
    banned = ((word >> (offs % 32)) & 1) == 0
    tl.store(logits_ptr + row * stride_l + offs, tl.full([BLOCK_V], float("-inf"), tl.float32), mask=in_vocab & banned)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """As `apply_token_bitmask_ref`: logits edited in place and returned."""
    assert logits.dtype == torch.float32 and logits.dim() == 2 and logits.stride(1) == 1, "logits: [num_seqs, vocab] fp32"
    assert bitmask.dtype == torch.int32 and bitmask.dim() == 2 and bitmask.is_contiguous(), "bitmask: [rows, words] int32"
    assert rows.dtype == torch.int64 and rows.shape == (bitmask.shape[0],), "rows: one int64 per bitmask row"
    assert logits.device == bitmask.device == rows.device, "logits, bitmask and rows on one device"
    if rows.numel():
        vocab, words = logits.shape[1], bitmask.shape[1]
        block = 1024
        _apply_token_bitmask_kernel[(rows.numel(), triton.cdiv(vocab, block))](
            logits, bitmask, rows, vocab, words, logits.stride(0), BLOCK_V=block)
    return logits
