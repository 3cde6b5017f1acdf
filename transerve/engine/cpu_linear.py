"""Faster linears for decode-sized batches on CPU.

MKL's float32 GEMM is much faster computed as `W @ x^T` than as `x @ W^T` when x has a few rows:
measured on a 2-core AMD EPYC (AVX2) over SmolLM2-135M's 211 linears (bench/cpu_linear.py), 2 to 64
rows run 1.6x to 3x faster that way round, 128 rows 1.3x; 1 row and long prompt chunks gain little,
so they keep `F.linear`. Decode steps of a continuous batch are exactly the skinny case.

The result is returned as the transposed view of `W @ x^T` (no copy): splitting heads with `.view`
and elementwise ops accept it, and a following linear gets a contiguous `x^T` for free.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_ROWS = 2
MAX_ROWS = 128


class SkinnyLinear(torch.nn.Linear):
    """An nn.Linear (same parameters, same state dict) that takes the `W @ x^T` route for 2-128 rows."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if not MIN_ROWS <= rows <= MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        flat_t = x.reshape(rows, x.shape[-1]).t()
        out = torch.mm(self.weight, flat_t) if self.bias is None else torch.addmm(self.bias[:, None], self.weight, flat_t)
        return out.t().view(*x.shape[:-1], self.out_features)


def use_skinny_linears(model: torch.nn.Module) -> int:
    """Switch every plain float32 CPU nn.Linear of `model` to SkinnyLinear in place; returns how many.

    Subclasses of nn.Linear (quantized or otherwise special layers) are left alone."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.device.type == "cpu" and module.weight.dtype == torch.float32:
            module.__class__ = SkinnyLinear
            count += 1
    return count
