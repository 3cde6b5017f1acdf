"""Routes for a quantized linear on CPU, over SmolLM2-135M's linear shapes, by batch rows.

    python bench/quant_bench.py [--rows 1 8 32] [--repeats 7] [--routes ...] [--threads N]
    python bench/quant_bench.py --stack     # all linears of one decode step (30 layers + LM head) in turn

Each shape gets `--copies` independent weights (30 = one per layer) run in turn, so they stream from memory
as in a real step; the LM head is one 49152x576 weight (Q8_0, as in SmolLM2's GGUF). Prints the median over
--repeats of the time per weight, and the max abs error against dequantize-then-float32 F.linear.
Routes:
  f32         float32 weights as served (SkinnyLinear's W @ x^T for 2-128 rows, F.linear otherwise)
  blocks      the served quantized path: GGUF blocks through the fused C++ kernel (engine/block_kernels.py)
  blocks_deq  the same blocks dequantized to float32 by the C++ kernel, then MKL's W @ x^T (the route
              long prompts took until the tiled kernel beat it)
  fbgemm      torch.ops.quantized.linear_dynamic, per-channel int8 prepacked for fbgemm (activations
              quantized to uint8 per call; weights re-rounded from the blocks)
  int8pack    torch._weight_int8pack_mm (per-channel int8)
  int4pack    torch._weight_int4pack_mm_for_cpu (groups of 32, scale and zero: Q4_1's blocks exactly)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import quantize

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from transerve.engine import block_kernels as bk  # noqa: E402

SHAPES = {"q 576->576": (576, 576), "k/v 576->192": (192, 576), "up/gate 576->1536": (1536, 576),
          "down 1536->576": (576, 1536), "lm_head 576->49152": (49152, 576)}
LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
ROUTES = ["f32", "blocks", "blocks_deq", "fbgemm", "int8pack", "int4pack"]


def random_blocks(n: int, k: int) -> tuple[str, torch.Tensor]:
    fmt = "Q8_0" if n == 49152 else "Q4_1"
    raw = quantize((torch.randn(n, k) * 0.05).numpy(), GGMLQuantizationType[fmt])
    return fmt, torch.from_numpy(raw).view(n, k // bk.BLOCK, -1)


def prepare(route: str, fmt: str, raw: torch.Tensor):
    """Per-weight state for a route, and the float32 weight it should equal (the oracle)."""
    blocks = bk.regroup(raw, fmt)
    w = bk.block_dequantize_ref(blocks)
    if route == "f32":
        return w, w
    if route.startswith("blocks"):
        return blocks, w
    if route == "fbgemm":  # torch marks quantized tensors deprecated; fbgemm's prepack still needs one
        warnings.simplefilter("ignore", UserWarning)
        row_scale = (w.abs().amax(1) / 127).double()
        qw = torch.quantize_per_channel(w, row_scale, torch.zeros_like(row_scale, dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(qw, None), qw.dequantize()
    if route == "int8pack":
        row_scale = w.abs().amax(1) / 127
        qi = torch.round(w / row_scale[:, None]).to(torch.int8)
        return (qi, row_scale), qi.float() * row_scale[:, None]
    if fmt != "Q4_1":
        return None, w  # int4pack: no Q8_0
    qs = raw[..., 4:]  # the file's Q4_1 blocks: float16 d, m, 16 bytes of nibbles
    nib = torch.cat([qs & 15, qs >> 4], -1).view(w.shape).to(torch.int32)
    d, m = (raw[..., i:i + 2].contiguous().view(torch.float16)[..., 0].float() for i in (0, 2))
    # torch's int4 dequantizes (q - 8) * scale + zero; Q4_1 is d * q + m, so zero = m + 8d.
    sz = torch.stack([d, m + 8 * d], -1).transpose(0, 1).contiguous()
    return (torch._convert_weight_to_int4pack_for_cpu(nib, 1), sz), w


def runner(route: str):
    return {
        "f32": lambda x, w: torch.mm(w, x.t()).t() if 2 <= x.shape[0] <= 128 else F.linear(x, w),
        "blocks": bk.block_linear,
        "blocks_deq": lambda x, b: torch.mm(bk.block_dequantize(b), x.t()).t(),
        "fbgemm": lambda x, packed: torch.ops.quantized.linear_dynamic(x, packed, False),
        "int8pack": lambda x, s: torch._weight_int8pack_mm(x, *s),
        "int4pack": lambda x, s: torch._weight_int4pack_mm_for_cpu(x, s[0], bk.BLOCK, s[1]),
    }[route]


def time_calls(calls, repeats: int) -> float:
    for call in calls:
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for call in calls:
            call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def shapes_main(args) -> None:
    print(f"us per weight (median of {args.repeats}; {args.copies} weights of a shape in turn), max abs error")
    for shape in args.shapes:
        n, k = SHAPES[shape]
        copies = 1 if n == 49152 else args.copies
        weights = [random_blocks(n, k) for _ in range(copies)]
        for route in args.routes:
            states = [prepare(route, fmt, raw) for fmt, raw in weights]
            if states[0][0] is None:
                continue
            fn = runner(route)
            cells = []
            for rows in args.rows:
                x = torch.randn(rows, k)
                seconds = time_calls([lambda s=s: fn(x, s) for s, _ in states], args.repeats)
                error = (fn(x, states[0][0]) - F.linear(x, states[0][1])).abs().max().item()
                cells.append(f"{seconds / copies * 1e6:>9.1f} ({error:.0e})")
            print(f"{shape:>20} {route:>10} " + " ".join(cells), flush=True)


def stack_main(args) -> None:
    print(f"all linears of one step (30 layers + LM head), ms, median of {args.repeats}")
    print(f"{'route':>10} " + " ".join(f"{'rows ' + str(r):>9}" for r in args.rows))
    weights = [random_blocks(n, k) for n, k in LAYER * 30 + [(49152, 576)]]
    for route in args.routes:
        states = [prepare(route, fmt, raw)[0] for fmt, raw in weights]
        if any(s is None for s in states):
            continue
        fn = runner(route)
        cells = []
        for rows in args.rows:
            inputs = {k: torch.randn(rows, k) for k in (576, 1536)}
            calls = [lambda s=s, x=inputs[raw.shape[1] * bk.BLOCK]: fn(x, s) for s, (_, raw) in zip(states, weights)]
            cells.append(f"{time_calls(calls, args.repeats) * 1e3:>9.1f}")
        print(f"{route:>10} " + " ".join(cells), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--routes", nargs="+", default=ROUTES, choices=ROUTES)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--copies", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--stack", action="store_true", help="time all linears of one decode step instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"kernels: {'C++ (AVX-512)' if bk.available() and torch.backends.cpu.get_cpu_capability() == 'AVX512' else 'C++ (AVX2)' if bk.available() else 'torch reference'}; "
          f"{args.threads} threads")
    with torch.inference_mode():
        (stack_main if args.stack else shapes_main)(args)


if __name__ == "__main__":
    main()
