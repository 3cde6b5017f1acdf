"""Linears that keep block-quantized weights (GGUF Q4_0, Q4_1, Q8_0; int8 of a float model) on CPU.

Weights are exactly the file's (f16 scales widened to float32, which is exact), as int8 values in
blocks of 32 along the input dimension with one scale per block, and for Q4_0/Q4_1 one minimum:
w = scale * q (+ minimum). Q4 values (0..15) are unpacked from their nibbles at load: one byte per
weight instead of half, because unpacking nibbles inside the fused kernel made a whole forward 3.7x
slower at batch 1 (bench/quant_bench.py --stack). Q4_0 is d * (q - 8), so its minimum is -8d (exact).

Blocks are tiled for the CPU: TILE consecutive output rows interleaved innermost ([out/TILE, in/32,
32, TILE]), so the fused kernel accumulates TILE outputs in vector registers and never reduces
horizontally inside a block.

Dequantization is fused into the matmul by `torch.compile` (inductor's C++ backend): the weight is read
as bytes and never stored as float32. That wins where a step streams weights (a few rows); from
DEQUANTIZE_FROM_ROWS rows the step is bound by arithmetic, and MKL's GEMM over a transient float32
copy of the weight is as fast as float32. Best inside a compiled model step, where the kernels join
the step's graph; called alone, each pays torch.compile's Python entry.
"""

from __future__ import annotations

import torch

BLOCK = 32
TILE = 16
DEQUANTIZE_FROM_ROWS = 8


def _tile_rows(out_features: int) -> int:
    return next(t for t in (TILE, 8, 4, 2, 1) if out_features % t == 0)


def tile(blocks: torch.Tensor) -> torch.Tensor:
    """[out, groups, ...] -> [out/tile, groups, ..., tile]: TILE output rows interleaved innermost."""
    out = blocks.shape[0]
    t = _tile_rows(out)
    tiled = blocks.reshape(out // t, t, *blocks.shape[1:])
    return tiled.movedim(1, -1).contiguous()


def untile(tiled: torch.Tensor) -> torch.Tensor:
    """The inverse of `tile`."""
    return tiled.movedim(-1, 1).reshape(tiled.shape[0] * tiled.shape[-1], *tiled.shape[1:-1])


# Fused kernels, traced by torch.compile. x is [rows, in]; the result [rows, out].
def int8_blocks_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows = x.shape[0]
    tiles, groups, _, t = qweight.shape
    partial = (qweight.float() * x.reshape(rows, 1, groups, BLOCK, 1)).sum(3)  # [rows, tiles, groups, t]
    return (partial * scale).sum(2).view(rows, tiles * t)


def int8_min_blocks_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    rows = x.shape[0]
    tiles, groups, _, t = qweight.shape
    xb = x.reshape(rows, 1, groups, BLOCK, 1)
    partial = (qweight.float() * xb).sum(3)
    block_sums = xb.sum(3)  # the minimum multiplies each block's sum of x
    return (partial * scale + block_sums * minimum).sum(2).view(rows, tiles * t)


def int8_blocks_dequantize(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight [out, in] (the oracle, and the large-batch path's transient copy)."""
    return untile(qweight.float() * scale.unsqueeze(2)).flatten(1)


def int8_min_blocks_dequantize(qweight: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    return untile(qweight.float() * scale.unsqueeze(2) + minimum.unsqueeze(2)).flatten(1)


_KERNELS = {"int8": (int8_blocks_matmul, int8_blocks_dequantize),
            "int8+min": (int8_min_blocks_matmul, int8_min_blocks_dequantize)}
_compiled: dict = {}


def _compiled_kernel(fn):
    if fn not in _compiled:
        # One specialization per (shape, rows): a model has a handful of linear shapes.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4096)
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


class QuantizedLinear(torch.nn.Module):
    """A bias-optional linear over tiled block-quantized weights; `fmt` names the source format."""

    def __init__(self, fmt: str, layout: str, blocks: dict[str, torch.Tensor], in_features: int, out_features: int,
                 bias: torch.Tensor | None = None, compiled: bool = True) -> None:
        super().__init__()
        self.fmt, self.layout, self.compiled = fmt, layout, compiled
        self.in_features, self.out_features = in_features, out_features
        self.names = tuple(blocks)
        for name, tensor in blocks.items():
            self.register_buffer(name, tensor)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def blocks(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in self.names)

    def dequantized_weight(self) -> torch.Tensor:
        return _KERNELS[self.layout][1](*self.blocks())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        matmul, dequantize = _KERNELS[self.layout]
        fused = torch.compiler.is_compiling() or self.compiled
        if self.compiled and not torch.compiler.is_compiling():
            # Alone, each call pays torch.compile's Python entry (~0.1-0.3 ms here); inside a compiled
            # model step the kernels are traced into the step's graph and that cost is gone.
            matmul, dequantize = _compiled_kernel(matmul), _compiled_kernel(dequantize)
        if fused and flat.shape[0] < DEQUANTIZE_FROM_ROWS:
            out = matmul(flat, *self.blocks())
        else:  # `W @ x^T`: MKL is faster that way round for skinny x (engine/cpu_linear.py)
            out = torch.mm(dequantize(*self.blocks()), flat.t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.fmt}, in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def int8_linear(qweight: torch.Tensor, scale: torch.Tensor, fmt: str, bias=None, compiled: bool = True) -> QuantizedLinear:
    """From row-major blocks: qweight int8 [out, in], scale [out, in/32]."""
    out, k = qweight.shape
    blocks = {"qweight": tile(qweight.view(out, k // BLOCK, BLOCK)), "scale": tile(scale.float())}
    return QuantizedLinear(fmt, "int8", blocks, k, out, bias, compiled)


def nibble_linear(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, fmt: str, bias=None,
                  compiled: bool = True) -> QuantizedLinear:
    """From row-major 4-bit blocks: packed uint8 [out, in/32, 16] in GGUF's order (byte j: element j in
    the low nibble, element j+16 in the high one), scale and minimum [out, in/32]."""
    out, groups, _ = packed.shape
    values = torch.cat([packed & 15, packed >> 4], dim=-1).to(torch.int8)  # [out, groups, 32]
    blocks = {"qweight": tile(values), "scale": tile(scale.float()), "minimum": tile(minimum.float())}
    return QuantizedLinear(fmt, "int8+min", blocks, groups * BLOCK, out, bias, compiled)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight-only symmetric int8 in groups of 32 along the input (as Q8_0): (qweight, scale)."""
    out, k = weight.shape
    groups = weight.detach().float().view(out, k // BLOCK, BLOCK)
    scale = groups.abs().amax(-1) / 127
    q = torch.round(groups / scale.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(-1))
    return q.clamp(-127, 127).to(torch.int8).view(out, k), scale


def use_int8_linears(model: torch.nn.Module, compiled: bool = True) -> int:
    """Replace every float CPU nn.Linear whose input size is a multiple of 32 by an int8 QuantizedLinear
    (`--quantization int8`). Returns how many were replaced."""
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is torch.nn.Linear and m.weight.device.type == "cpu" and m.in_features % BLOCK == 0]
    for name, module in targets:
        qweight, scale = quantize_int8(module.weight)
        bias = None if module.bias is None else module.bias.detach().float()
        model.set_submodule(name, int8_linear(qweight, scale, "int8", bias, compiled))
    return len(targets)
