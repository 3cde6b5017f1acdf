"""Faster linears for decode-sized batches on CPU.

MKL's float32 GEMM is much faster computed as `W @ x^T` than as `x @ W^T` when x has a few rows:
measured on a 2-core AMD EPYC (AVX2) over SmolLM2-135M's 211 linears (bench/cpu_linear.py), 2 to 64
rows run 1.6x to 3x faster that way round, 128 rows 1.3x; long prompt chunks gain little, so they
keep `F.linear`. Decode steps of a continuous batch are exactly the skinny case.

One row (a single sequence decoding) is different: there `x @ W^T` streams the weights about 15-20%
faster from a transposed copy of W (`x @ Wt`, Wt contiguous). That copy doubles the linears' memory and
is slower from 2 rows up, so it is kept beside W, and only when the weights are small next to the RAM.

The result is returned as the transposed view of `W @ x^T` (no copy): splitting heads with `.view`
and elementwise ops accept it, and a following linear gets a contiguous `x^T` for free.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_ROWS = 2
MAX_ROWS = 128


class SkinnyLinear(torch.nn.Linear):
    """An nn.Linear (same parameters, same state dict) that takes the `W @ x^T` route for 2-128 rows,
    and `x @ weight_t` for one row when it holds that copy."""

    weight_t: torch.Tensor | None = None  # [in_features, out_features] contiguous; not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if rows == 1 and self.weight_t is not None:
            flat = x.reshape(1, x.shape[-1])
            out = torch.mm(flat, self.weight_t) if self.bias is None else torch.addmm(self.bias[None], flat, self.weight_t)
            return out.view(*x.shape[:-1], self.out_features)
        if not MIN_ROWS <= rows <= MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        flat_t = x.reshape(rows, x.shape[-1]).t()
        out = torch.mm(self.weight, flat_t) if self.bias is None else torch.addmm(self.bias[:, None], self.weight, flat_t)
        return out.t().view(*x.shape[:-1], self.out_features)


def use_skinny_linears(model: torch.nn.Module, transposed_copy_budget: int = 0) -> int:
    """Switch every plain float32 CPU nn.Linear of `model` to SkinnyLinear in place, and give each a
    transposed copy of its weight for one-row steps when all copies fit in `transposed_copy_budget`
    bytes. Returns how many linears were switched.

    Subclasses of nn.Linear (quantized or otherwise special layers) are left alone."""
    linears = [m for m in model.modules()
               if type(m) is torch.nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
    weights = {id(m.weight): m.weight for m in linears}  # tied weights are copied once
    copy_bytes = sum(w.numel() * w.element_size() for w in weights.values())
    copies = {key: w.detach().t().contiguous() for key, w in weights.items()} if 0 < copy_bytes <= transposed_copy_budget else {}
    for module in linears:
        module.__class__ = SkinnyLinear
        module.weight_t = copies.get(id(module.weight))
    return len(linears)


def transposed_copy_bytes(model: torch.nn.Module) -> int:
    """Memory held by the one-row copies of use_skinny_linears."""
    copies = {id(m.weight_t): m.weight_t for m in model.modules() if isinstance(m, SkinnyLinear) and m.weight_t is not None}
    return sum(t.numel() * t.element_size() for t in copies.values())
