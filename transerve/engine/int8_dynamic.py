"""The CPU linear quantized weights are served with: fbgemm's dynamic int8 GEMM (torch.ops.quantized).

Weights are int8 per output row, prepacked once for fbgemm; each call quantizes the activations to uint8
and runs fbgemm's AVX2/AVX-512 integer GEMM. On a 2-core AVX2 EPYC with one thread (bench/quant_bench.py,
SmolLM2-135M's shapes) it is the fastest route at both 1 and 32 rows: about half of float32's time,
where the compiled block kernels of engine/quantized.py were slower than float32 from a few rows up.

fbgemm quantizes activations with one scale per call: over a prefill chunk or a batch, one outlier token
sets the step for all, and SmolLM2's perplexity (bench/quality.py) went from 16.7 to 51.6. So each row is
divided by its own absolute maximum before the call and multiplied back after (the product is linear in
each row): one scale per token, and one extra row pins the range so that a token's result does not depend
on the rest of the batch (a prompt prefilled in other chunks, from the prefix cache, answers the same). Activations use the full 8 bits (reduce_range=False): 7 bits cost
SmolLM2 +9% perplexity, 8 bits +2%. The weights are the file's blocks re-rounded to one int8 scale per row.
"""

from __future__ import annotations

import warnings

import torch


# fbgemm's packed weights are a TorchScript object that torch.compile cannot take as an argument, so the
# compiled decode step (engine/compiled_step.py) reaches them through this opaque op and a table of
# packed weights by key: the op's int argument is a constant in the graph. Entries live as long as the
# process (a model's linears are few; an unloaded model leaves its packed weights here).
_PACKED: dict[int, object] = {}


@torch.library.custom_op("transerve::int8_dynamic_linear", mutates_args=())
def _linear(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic(x, _PACKED[key], False)


@_linear.register_fake
def _(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


def available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


class DynamicInt8Linear(torch.nn.Module):
    """y = x W^T + b with W int8 per output row, prepacked for fbgemm. `fmt` names the weights' source
    ('Q4_1' from a GGUF's blocks, 'int8' from a float model)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str) -> None:
        super().__init__()
        self.fmt = fmt
        self.out_features, self.in_features = weight.shape
        weight = weight.detach().float()
        scale = (weight.abs().amax(1) / 127).clamp(min=1e-12).double()
        with warnings.catch_warnings():  # torch marks quantized tensors deprecated; fbgemm's prepack needs one
            warnings.simplefilter("ignore", UserWarning)
            qweight = torch.quantize_per_channel(weight, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().float(), requires_grad=False)
        self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.register_buffer("_range_row", torch.zeros(1, self.in_features), persistent=False)
        self._range_row[0, :2] = torch.tensor([1.0, -1.0])
        self._key = id(self._packed)
        _PACKED[self._key] = self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        row_max = flat.abs().amax(1, keepdim=True).float().clamp(min=1e-30)
        # fbgemm takes the activations' range from the call's min and max: one extra row holding 1 and -1
        # pins it to [-1, 1], so a token's result never depends on what else is in the batch.
        rows = flat.shape[0]
        scaled = torch.cat([flat / row_max, self._range_row])
        if torch.compiler.is_compiling():
            out = _linear(scaled, self._key, self.out_features)[:rows] * row_max
        else:
            out = torch.ops.quantized.linear_dynamic(scaled, self._packed, False)[:rows] * row_max
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        weight, _ = torch.ops.quantized.linear_unpack(self._packed)
        return weight.dequantize()

    def nbytes(self) -> int:
        return self.out_features * self.in_features + 8 * self.out_features

    def extra_repr(self) -> str:
        return f"{self.fmt} as int8 per row (fbgemm), in_features={self.in_features}, out_features={self.out_features}"


def use_dynamic_int8(model: torch.nn.Module, float_linears: bool = False) -> int:
    """Swap every QuantizedLinear (a GGUF's blocks, or int8 blocks of a float model) for a
    DynamicInt8Linear over the same weights; with `float_linears`, every float32 nn.Linear instead
    (`--quantization int8`: one rounding, straight from float). Returns how many were swapped."""
    from transerve.engine.quantized import QuantizedLinear

    def wanted(m: torch.nn.Module) -> bool:
        if float_linears:
            return type(m) is torch.nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
        return isinstance(m, QuantizedLinear)

    targets = [(name, m) for name, m in model.named_modules() if wanted(m)]
    for name, module in targets:
        weight = module.weight if float_linears else module.dequantized_weight()
        model.set_submodule(name, DynamicInt8Linear(weight, module.bias, "int8" if float_linears else module.fmt))
    return len(targets)
