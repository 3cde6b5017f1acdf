"""Shared by the kernel tests: where they run, how the Triton modules are imported, random paged batches.

By default the kernels run on the CPU under Triton's interpreter with small shapes. With
TRANSERVE_KERNEL_TESTS=gpu (bench/gpu_check.sh sets it) they run compiled on CUDA at real shapes.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import SimpleNamespace

import pytest
import torch

GPU = os.environ.get("TRANSERVE_KERNEL_TESTS") == "gpu"
DEVICE = torch.device("cuda" if GPU else "cpu")
if GPU and not torch.cuda.is_available():  # every module that imports this would fail, not skip
    pytest.skip("TRANSERVE_KERNEL_TESTS=gpu needs CUDA", allow_module_level=True)
KERNEL_MODULES = ("transerve.kernels.kv_cache", "transerve.kernels.paged_attention", "transerve.kernels.sampling",
                  "transerve.kernels.token_bitmask")


def import_kernels() -> SimpleNamespace:
    """The Triton kernel modules, interpreted on CPU.

    Triton decides between compiling and interpreting when `@triton.jit` runs, at import, from
    TRITON_INTERPRET. Set it only around the import (re-importing modules that an earlier import
    compiled), so the rest of the suite, which reads the variable at call time, keeps the references."""
    if GPU:
        pytest.importorskip("triton")
        if not torch.cuda.is_available():
            pytest.skip("TRANSERVE_KERNEL_TESTS=gpu needs CUDA", allow_module_level=True)
        return SimpleNamespace(**{name.rsplit(".", 1)[1]: importlib.import_module(name) for name in KERNEL_MODULES})
    already_imported = "triton" in sys.modules
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        triton = pytest.importorskip("triton")
        # triton.language's own helpers (tl.sum, tl.cdiv...) were decorated when triton was first imported.
        if already_imported and type(triton.language.standard.sum).__name__ != "InterpretedFunction":
            pytest.fail(
                "triton was imported before TRITON_INTERPRET=1 was set, so its own helpers are compiled-only: "
                "import tests/kernel_utils.py first (e.g. from a conftest.py) or run the kernel tests in their "
                "own process (TRITON_INTERPRET=1 python -m pytest tests/test_kernel*.py)", pytrace=False)
        modules = {}
        for name in KERNEL_MODULES:
            module = sys.modules.get(name)
            if module is None:
                module = importlib.import_module(name)
            elif not interpreted(module):
                module = importlib.reload(module)
            modules[name.rsplit(".", 1)[1]] = module
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    return SimpleNamespace(**modules)


def interpreted(module) -> bool:
    kernels = [v for k, v in vars(module).items() if k.startswith("_") and k.endswith("_kernel")]
    return all(type(k).__name__ == "InterpretedFunction" for k in kernels)


def randn(*shape, dtype=torch.float32, device=DEVICE) -> torch.Tensor:
    return torch.randn(*shape, device=device).to(dtype)


def paged_batch(q_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype,
                spare_blocks=7, device=DEVICE):
    """A packed batch over a NaN-poisoned cache: sequence i has context_lens[i] cached tokens then
    q_lens[i] new ones (already in the cache, as after write_kv), on randomly permuted blocks."""
    seq_lens = [c + q for c, q in zip(context_lens, q_lens)]
    blocks = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks) + spare_blocks
    # Random, non-sequential block ids from the top of the cache, so a big cache really uses big offsets.
    pool = min(num_blocks, 2 * sum(blocks) + 8)
    perm = num_blocks - 1 - torch.randperm(pool, device=device)[: sum(blocks)]
    tables = torch.zeros(len(seq_lens), max(blocks), dtype=torch.int32, device=device)
    slots = []
    used = 0
    for i, (n, b) in enumerate(zip(seq_lens, blocks)):
        tables[i, :b] = perm[used : used + b].to(torch.int32)
        used += b
        pos = torch.arange(n, device=device)
        slots.append(tables[i, pos // block_size].long() * block_size + pos % block_size)
    slots = torch.cat(slots)
    k_cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=device)
    v_cache = k_cache.clone()
    k_cache.view(-1, num_kv_heads, head_dim)[slots] = randn(len(slots), num_kv_heads, head_dim, dtype=dtype, device=device)
    v_cache.view(-1, num_kv_heads, head_dim)[slots] = randn(len(slots), num_kv_heads, head_dim, dtype=dtype, device=device)
    num_tokens = sum(q_lens)
    # The model runner's query is a transposed view of [1, heads, tokens, head_dim].
    query = randn(1, num_heads, num_tokens, head_dim, dtype=dtype, device=device)[0].transpose(0, 1)
    qsl = torch.tensor([0] + q_lens, device=device).cumsum(0).to(torch.int32)
    return SimpleNamespace(
        query=query, k_cache=k_cache, v_cache=v_cache, block_tables=tables,
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), query_start_loc=qsl,
        scale=head_dim ** -0.5,
    )


ATOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}
