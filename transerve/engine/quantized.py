"""Linears that keep GGUF block-quantized weights (Q4_0, Q4_1, Q8_0) on CPU, as the file's own bytes.

A GGUF's tensors are kept as the file's blocks (engine/gguf_weights.py; regrouped in tiles of 16 rows, as many bytes); a float
model's linears become Q8_0 blocks with `--quantization int8` (llama.cpp's own rounding, through the gguf
package). The C++ kernel multiplies float32 activations by the blocks with dequantization fused
(engine/block_kernels.py): a single sequence streams ~5-bit weights instead of float32 ones, and a batch or a
prompt chunk dequantizes each weight once per 16 rows, in registers.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from transerve.engine.block_kernels import BLOCK, FILE_BLOCK_BYTES, block_dequantize, block_linear, regroup

# All of SmolLM2-135M's linears, 2-core Xeon with AVX-512 (bench/quant_bench.py --stack): the C++ kernel
# 7-9 ms at 1 row, 46 at 32, 176 at 128, 394 at 256; dequantized to float32 and MKL's GEMM 354 at 128, 561 at 256
# (float32 weights themselves 265, 504): the fused kernel serves every size.


class QuantizedLinear(torch.nn.Module):
    """y = x W^T + b with W a GGUF tensor's blocks of format `fmt`, uint8 [out, in/32, file block bytes]
    (regrouped for the kernels: block_kernels.regroup)."""

    def __init__(self, fmt: str, blocks: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.fmt = fmt
        self.out_features, groups, _ = blocks.shape
        self.in_features = groups * BLOCK
        self.register_buffer("blocks", regroup(blocks, fmt))
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float(), requires_grad=False)

    @classmethod
    def from_rows(cls, fmt: str, rows: np.ndarray, bias: torch.Tensor | None = None) -> "QuantizedLinear":
        """From a GGUF tensor's raw rows: uint8 [out, in/32 * block bytes]."""
        rows = np.array(rows)  # a copy: a GGUF's tensors are read-only memory maps
        return cls(fmt, torch.from_numpy(rows.reshape(rows.shape[0], -1, FILE_BLOCK_BYTES[fmt])), bias)

    def dequantized_weight(self) -> torch.Tensor:
        return block_dequantize(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = block_linear(x.reshape(-1, self.in_features), self.blocks)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def nbytes(self) -> int:
        return self.blocks.numel()

    def extra_repr(self) -> str:
        return f"{self.fmt}, in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def use_int8_linears(model: torch.nn.Module) -> int:
    """Replace every float CPU nn.Linear whose input size is a multiple of 32 by a Q8_0 QuantizedLinear
    (`--quantization int8`: weight-only, one float16 scale per 32 inputs). Returns how many were replaced."""
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is torch.nn.Linear and m.weight.device.type == "cpu" and m.in_features % BLOCK == 0]
    for name, module in targets:
        rows = quantize(module.weight.detach().float().numpy(), GGMLQuantizationType.Q8_0)
        model.set_submodule(name, QuantizedLinear.from_rows("Q8_0", rows, module.bias))
    return len(targets)
