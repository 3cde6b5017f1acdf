"""Our paged attention inside stock transformers models: the function registered with AttentionInterface.

The model is called with every token of a step packed into one row, and with `paged_batch=PagedBatch(...)`
among its keyword arguments, which transformers hands to the attention function unchanged. The function
writes the layer's new K/V into the paged cache (`layer_idx` from the module) and attends over the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

ATTN_IMPLEMENTATION = "transerve_paged"


@dataclass
class PagedBatch:
    """What the attention function needs for one step. Built per step, read by every layer."""

    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor
    write_kv: Callable
    paged_attention: Callable


def paged_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: query [1, heads, tokens, head_dim] -> [1, tokens, heads, head_dim]."""
    batch: PagedBatch = kwargs["paged_batch"]
    k_cache, v_cache = batch.kv_caches[module.layer_idx]
    q = query[0].transpose(0, 1)
    batch.write_kv(key[0].transpose(0, 1), value[0].transpose(0, 1), k_cache, v_cache, batch.slot_mapping)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    out = batch.paged_attention(
        q, k_cache, v_cache, batch.block_tables, batch.seq_lens, batch.query_start_loc, scale, kwargs.get("sliding_window")
    )
    return out.unsqueeze(0), None


def register_attention() -> None:
    """Make `attn_implementation="transerve_paged"` known to transformers (idempotent)."""
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
    # The paged kernel applies causality itself: skip building dense masks.
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, lambda *args, **kwargs: None)
