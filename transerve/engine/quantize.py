"""Which weights a loaded model computes with: `--quantization` applied after load (as cpu_linear does).

- `none` (default): every model in float (a GGUF fully dequantized, as transformers loads it). Default because
  on SmolLM2 at one user the int8 route was no faster in serving (18.8 vs 20.2 tok/s, bench/README.md) and
  its greedy answers agree with float32 on only 42.5% of tokens (bench/quality.py).
- `gguf`: a GGUF model keeps its file's Q4_0/Q4_1/Q8_0 weights on CPU (engine/gguf_weights.py), served as
  int8 per row (a quarter of float32's memory); tensors of other GGUF types stay float32. Others: float.
- `int8`: as `gguf`, and the float linears left after it become int8 per row (weight-only).

Quantized linears are a CPU float32 feature: on CUDA `int8` is refused (a clear error at load) and `gguf`
expands a GGUF to float as before, saying so in the log. With another dtype on CPU the model stays float.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from transerve.engine import int8_dynamic
from transerve.engine.gguf_weights import use_gguf_linears
from transerve.engine.int8_dynamic import DynamicInt8Linear
from transerve.engine.quantized import QuantizedLinear, use_int8_linears

log = logging.getLogger(__name__)

MODES = ("none", "gguf", "int8")


def gguf_source(model_dir: str) -> str | None:
    """The GGUF file a materialized directory was converted from (engine/models.py `materialize`)."""
    marker = Path(model_dir) / "transerve.json"
    if not marker.is_file():
        return None
    source = json.loads(marker.read_text()).get("source")
    return source if source and Path(source).is_file() else None


KERNELS = ("fbgemm", "blocks")


def quantize_model(model: torch.nn.Module, mode: str, model_dir: str, device: torch.device, dtype: torch.dtype,
                   kernel: str = "fbgemm") -> str:
    """Swap the model's linears for quantized ones as `mode` asks; returns the precision it now runs in
    (quantized.precision: e.g. 'Q4_1+Q8_0 (int8 fbgemm)', 'int8 (fbgemm)', 'float32').

    `kernel`: fbgemm (engine/int8_dynamic.py: the fastest here, at 1 row and at 32; weights re-rounded to
    int8 per row) where torch has it, else blocks (engine/quantized.py: the file's exact blocks, compiled
    fused kernels). bench/quality.py compares the two."""
    if mode not in MODES:
        raise ValueError(f"quantization must be one of {', '.join(MODES)}, got {mode!r}")
    gguf = gguf_source(model_dir)
    if mode == "none":
        return precision(model)
    if device.type != "cpu":
        if mode == "int8":
            raise ValueError("--quantization int8 is a CPU feature (quantized linears run on CPU only); "
                             "on CUDA use --quantization gguf or none")
        if gguf is not None:
            log.info("%s: GGUF weights dequantized to %s (quantized linears run on CPU only)", gguf, dtype)
        return precision(model)
    if dtype != torch.float32:
        if mode == "int8" or gguf is not None:
            log.info("quantized linears need --dtype float32 on CPU; running in %s", dtype)
        return precision(model)
    if kernel == "fbgemm" and not int8_dynamic.available():
        kernel = "blocks"
    if gguf is not None:
        _, skipped = use_gguf_linears(model, gguf)
        if skipped:
            log.info("%s: %s kept as float32 (no quantized kernel for these GGUF types)", gguf,
                     ", ".join(f"{n} {fmt} tensors" for fmt, n in sorted(skipped.items())))
    if mode == "int8" and kernel == "fbgemm":
        int8_dynamic.use_dynamic_int8(model, float_linears=True)
    elif mode == "int8":
        use_int8_linears(model)
    if kernel == "fbgemm":
        int8_dynamic.use_dynamic_int8(model)
    return precision(model)


def precision(model: torch.nn.Module) -> str:
    """What the linears compute in, for /v1/models and the startup log: e.g. 'Q4_1+Q8_0', 'float32', or
    'Q4_1+Q8_0 (int8 fbgemm)' when those weights are computed by engine/int8_dynamic.py."""
    blocks = {m.fmt for m in model.modules() if isinstance(m, QuantizedLinear)}
    dynamic = {m.fmt for m in model.modules() if isinstance(m, DynamicInt8Linear)}
    if not blocks and not dynamic:
        return str(next(model.parameters()).dtype).removeprefix("torch.")
    return "+".join(sorted(blocks | dynamic)) + (" (int8 fbgemm)" if dynamic else "")
