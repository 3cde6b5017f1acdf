"""Which weights a loaded model computes with: `--quantization` applied after load (as cpu_linear does).

- `auto` (default): `gguf` where it can run (CPU, float32, the C++ kernels built), else `none`. The file's
  blocks are the file's weights, so answers are float32's up to rounding (bench/quality.py); on SmolLM2
  they are faster up to 8 users (1.3-1.5x), at par at 32, in a fifth of the memory (bench/README.md). A
  machine without a C++ compiler runs float32 (one log line).
- `none`: every model in float (a GGUF fully dequantized, as transformers loads it).
- `gguf`: a GGUF model keeps its file's Q4_0/Q4_1/Q8_0 tensors byte for byte on CPU (engine/gguf_weights.py),
  computed by the fused C++ kernels of engine/block_kernels.py; tensors of other GGUF types stay float32.
  Other models: float.
- `int8`: as `gguf`, and the float linears left after it become Q8_0 blocks (weight-only, one scale per 32).

Quantized linears are a CPU float32 feature: on CUDA `int8` is refused (a clear error at load) and `gguf`
expands a GGUF to float as before, saying so in the log. With another dtype on CPU, or where the C++ kernels
cannot be built, the model stays float (and the log says why).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from transerve.config import QUANTIZATION_MODES
from transerve.engine import block_kernels
from transerve.engine.gguf_weights import use_gguf_linears
from transerve.engine.quantized import QuantizedLinear, use_int8_linears

log = logging.getLogger(__name__)


def gguf_source(model_dir: str) -> str | None:
    """The GGUF file a materialized directory was converted from (engine/models.py `materialize`)."""
    marker = Path(model_dir) / "transerve.json"
    if not marker.is_file():
        return None
    source = json.loads(marker.read_text()).get("source")
    return source if source and Path(source).is_file() else None


def quantize_model(model: torch.nn.Module, mode: str, model_dir: str, device: torch.device, dtype: torch.dtype) -> str:
    """Swap the model's linears for quantized ones as `mode` asks; returns the precision it now runs in
    (`precision`: e.g. 'Q4_1+Q8_0', 'float32')."""
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_MODES)}, got {mode!r}")
    gguf = gguf_source(model_dir)
    if mode == "auto":  # the checks below say why a GGUF, where it cannot, runs in float
        mode = "gguf" if gguf is not None else "none"
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
    if not block_kernels.available():  # it logged why
        return precision(model)
    if gguf is not None:
        _, skipped = use_gguf_linears(model, gguf)
        if skipped:
            log.info("%s: %s kept as float32 (no quantized kernel for these GGUF types)", gguf,
                     ", ".join(f"{n} {fmt} tensors" for fmt, n in sorted(skipped.items())))
    if mode == "int8":
        use_int8_linears(model)
    return precision(model)


def precision(model: torch.nn.Module) -> str:
    """What the linears compute in, for /v1/models and the startup log: e.g. 'Q4_1+Q8_0' or 'float32'."""
    formats = {m.fmt for m in model.modules() if isinstance(m, QuantizedLinear)}
    if not formats:
        return str(next(model.parameters()).dtype).removeprefix("torch.")
    return "+".join(sorted(formats))
