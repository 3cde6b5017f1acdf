"""Kernel dispatch: Triton on CUDA (or everywhere with TRITON_INTERPRET=1), torch references elsewhere."""

from __future__ import annotations

import os

import torch

from transerve.kernels.reference import (
    SampleOutput, apply_token_bitmask_ref, paged_attention_ref, sample_ref, write_kv_ref,
)


def use_triton(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def kernels_for(device: torch.device):
    """(write_kv, paged_attention, sample) for `device`."""
    if use_triton(device):
        try:
            from transerve.kernels.kv_cache import write_kv
            from transerve.kernels.paged_attention import paged_attention
            from transerve.kernels.sampling import sample
        except ImportError:  # no Triton kernels on this install: the references are exact, only slower
            return write_kv_ref, paged_attention_ref, sample_ref
        return write_kv, paged_attention, sample
    return write_kv_ref, paged_attention_ref, sample_ref


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Constrained decoding's mask, on the logits' device (see `apply_token_bitmask_ref`). On CPU, xgrammar's
    own C++ loop, about ten times faster than the torch reference (which stays the test oracle)."""
    if use_triton(logits.device):
        try:
            from transerve.kernels.token_bitmask import apply_token_bitmask as kernel
        except ImportError:
            return apply_token_bitmask_ref(logits, bitmask, rows)
        return kernel(logits, bitmask, rows)
    if logits.device.type == "cpu" and bitmask.shape[1] * 32 >= logits.shape[1]:
        import xgrammar

        index = rows.tolist()
        if index != list(range(logits.shape[0])):  # xgrammar wants the bitmask row of each logits row
            full = torch.full((logits.shape[0], bitmask.shape[1]), -1, dtype=torch.int32)
            full[rows] = bitmask
            bitmask = full
        xgrammar.apply_token_bitmask_inplace(logits, bitmask, indices=index)
        return logits
    return apply_token_bitmask_ref(logits, bitmask, rows)


__all__ = ["apply_token_bitmask", "apply_token_bitmask_ref", "SampleOutput", "kernels_for", "use_triton", "paged_attention_ref", "sample_ref", "write_kv_ref"]
