"""GGUF's block-quantized linears on CPU: the C++ kernels of transerve/csrc/block_linear.cpp and their torch references.

A weight is a GGUF tensor's Q4_0, Q4_1 or Q8_0 blocks (32 weights each), the file's own bytes regrouped in tiles of
16 output rows (`regroup`; csrc/block_formats.h): per block group, the tile's float16 scales (d, and m for the 4-bit
formats: w = d * q + m, Q4_0's m = -8d), then its values chunk by chunk, one byte of each row's block a chunk. So
one vector load gives the same input's weight for 16 outputs. Shaped uint8 [out, in/32, 20] for the 4-bit formats
and [out, in/32, 34] for Q8_0: the dimensions count the bytes, not the order they lie in.
`block_linear` multiplies float32 activations by such a weight with dequantization fused (AVX2, or AVX-512
where the CPU has it); `block_dequantize` gives the float32 weight, bit for bit as the gguf package does.
The kernels are compiled at first use (torch.utils.cpp_extension, ~20 s; cached in torch's extension
directory, so later starts load them at once). Where they cannot be built (no compiler, no AVX2)
`available()` is False and the references below compute the same thing, slowly.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BLOCK = 32
FILE_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # as stored in a GGUF
NIBBLES, BYTES = 20, 34  # block sizes as the kernels take them (Q4_0's are 20: its m is stored too)
TILE = 16  # output rows a tile, as csrc/block_formats.h's TILE
_SOURCES = [Path(__file__).resolve().parent.parent / "csrc" / name for name in ("block_linear.cpp", "block_linear_avx512.cpp")]
_loaded: bool | None = None


def available() -> bool:
    """Whether the C++ kernels are built and loaded (built on the first call)."""
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded


def _load() -> bool:
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        log.info("the block-quantized CPU kernels need AVX2: quantized GGUF weights run as float32")
        return False
    try:
        from torch.utils import cpp_extension

        log.info("loading the block-quantized CPU kernels (built on first use, ~20 s, then cached)")
        cpp_extension.load(name="transerve_blocks", sources=[str(p) for p in _SOURCES], is_python_module=False,
                           extra_cflags=["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-ffp-contract=off"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # noqa: BLE001 - any build failure means: serve float weights instead
        log.warning("block-quantized CPU kernels unavailable (%s): quantized GGUF weights run as float32",
                    str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__)
        return False
    _register_fakes()
    return True


def _register_fakes() -> None:
    # Shapes for torch.compile's tracing: the ops join a compiled step's graph as extern calls.
    @torch.library.register_fake("transerve_blocks::block_linear")
    def _(x, weight):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("transerve_blocks::block_dequantize")
    def _(weight):
        return weight.new_empty(weight.shape[0], weight.shape[1] * BLOCK, dtype=torch.float32)


def regroup(blocks: torch.Tensor, fmt: str) -> torch.Tensor:
    """A GGUF tensor's blocks, uint8 [out, in/32, file block bytes], as the kernels read them (in tiles)."""
    assert blocks.dtype == torch.uint8 and blocks.shape[-1] == FILE_BLOCK_BYTES[fmt], (fmt, blocks.shape)
    out, groups, _ = blocks.shape
    if fmt == "Q8_0":
        scales, values = [blocks[..., 0:2]], blocks[..., 2:]
    elif fmt == "Q4_1":
        scales, values = [blocks[..., 0:2], blocks[..., 2:4]], blocks[..., 4:]
    else:  # Q4_0: w = d * (q - 8) = d * q + m with m = -8d, exact in float16 (a power-of-two multiple)
        d = blocks[..., 0:2].contiguous().view(torch.float16)
        m = (-8 * d.float()).half()
        assert torch.isfinite(m).all(), "a Q4_0 scale too large for float16 after x8"
        scales, values = [d.view(torch.uint8), m.view(torch.uint8)], blocks[..., 2:]
    tiles = []
    for start, count, width in _tiles(out):
        rows = slice(start, start + count * width)
        parts = [s[rows].reshape(count, width, groups, 2).transpose(1, 2).reshape(count, groups, -1) for s in scales]
        parts.append(values[rows].reshape(count, width, groups, -1).permute(0, 2, 3, 1).reshape(count, groups, -1))
        tiles.append(torch.cat(parts, dim=-1).flatten())
    return torch.cat(tiles).view(out, groups, -1)


def _tiles(out: int) -> list[tuple[int, int, int]]:
    """(first row, tiles, rows a tile): the full tiles, then a narrower last one."""
    full, width = divmod(out, TILE)
    return [(0, full, TILE)] * bool(full) + [(full * TILE, 1, width)] * bool(width)


def _check(weight: torch.Tensor) -> None:
    assert weight.dtype == torch.uint8 and weight.dim() == 3 and weight.shape[2] in (NIBBLES, BYTES), weight.shape


def block_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x float32 [rows, in] -> [rows, out], the weight dequantized on the fly."""
    _check(weight)
    assert x.dim() == 2 and x.shape[1] == weight.shape[1] * BLOCK and x.dtype == torch.float32, x.shape
    if not available():
        return block_linear_ref(x, weight)
    return torch.ops.transerve_blocks.block_linear(x.contiguous(), weight)


def block_dequantize(weight: torch.Tensor) -> torch.Tensor:
    """The float32 weight [out, in]."""
    _check(weight)
    if not available():
        return block_dequantize_ref(weight)
    return torch.ops.transerve_blocks.block_dequantize(weight)


def block_linear_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x @ block_dequantize_ref(weight).t()


def block_dequantize_ref(weight: torch.Tensor) -> torch.Tensor:
    out, groups, block_bytes = weight.shape
    scale_count = 2 if block_bytes == NIBBLES else 1
    stored, parts = weight.reshape(-1), []
    for start, count, width in _tiles(out):
        tiles = stored[start * groups * block_bytes:(start + count * width) * groups * block_bytes].view(count, groups, -1)
        scales = tiles[..., :2 * width * scale_count].contiguous().view(torch.float16).float().view(count, groups, scale_count, 1, width)
        values = tiles[..., 2 * width * scale_count:].reshape(count, groups, -1, width)  # [tile, group, chunk, row]
        if block_bytes == BYTES:
            w = values.contiguous().view(torch.int8).float() * scales[:, :, 0]
        else:
            w = scales[:, :, 0] * torch.cat([values & 15, values >> 4], dim=2).float() + scales[:, :, 1]
        parts.append(w.permute(0, 3, 1, 2).reshape(count * width, groups * BLOCK))
    return torch.cat(parts)
