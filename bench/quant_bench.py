"""Routes for a quantized linear on CPU, over SmolLM2-135M's linear shapes, by batch rows.

    python bench/quant_bench.py [--rows 1 32] [--repeats 7] [--routes ...] [--threads N]
    python bench/quant_bench.py --stack     # all linears of one forward, eager vs compiled as one graph
    python bench/quant_bench.py --smollm2   # whole SmolLM2 forwards, float32 vs its GGUF's blocks

Each shape gets `--copies` independent weights (30 = one per layer) that are run in turn, so they
stream from memory as in a real step; the LM head is one 49152x576 weight. Prints the median over
--repeats of the time per weight, and the max abs error against dequantize-then-float32 F.linear.
Routes:
  f32            F.linear on float32 weights (today's path; SkinnyLinear's W @ x^T for 2-128 rows)
  int8pack       torch._weight_int8pack_mm (per-channel int8; its fast paths want AVX-512)
  int4pack       torch._weight_int4pack_mm_for_cpu (group 32, scale and zero)
  fbgemm         torch.ops.quantized.linear_dynamic over fbgemm-prepacked per-channel int8 (activations
                 quantized to uint8 per call; AVX2 kernels; not the file's blocks: weights re-rounded)
  fbgemm_fp16    torch.ops.quantized.linear_dynamic_fp16 over fbgemm-prepacked float16 weights (no
                 activation quantization; half of float32's bytes)
  q8_fused       compiled fused dequantize+matmul of tiled Q8_0-style int8 blocks (engine/quantized.py)
  q4_fused       the same for Q4_1-style 4-bit blocks (scale and min; values unpacked to bytes)
  q8_dequant_mm  compiled dequantize to float32, then MKL's W @ x^T
  q4_dequant_mm  the same for nibble blocks
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from transerve.engine import quantized as q  # noqa: E402
from transerve.engine.cpu_linear import use_skinny_linears  # noqa: E402

SHAPES = {"q 576->576": (576, 576), "k/v 576->192": (192, 576), "up/gate 576->1536": (1536, 576),
          "down 1536->576": (576, 1536), "lm_head 576->49152": (49152, 576)}
LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
STACK_ROUTES = ["f32 eager", "f32 compiled", "Q4_1+Q8_0 per-linear", "Q4_1+Q8_0 compiled", "int8 compiled"]
ROUTES = ["f32", "fbgemm", "fbgemm_fp16", "int8pack", "int4pack", "q8_fused", "q4_fused", "q8_dequant_mm", "q4_dequant_mm"]


def random_weights(n: int, k: int):
    groups = k // q.BLOCK
    return {
        "qweight": torch.randint(-127, 128, (n, k), dtype=torch.int8),
        "scale": torch.rand(n, groups) * 0.01,
        "packed": torch.randint(0, 256, (n, groups, 16), dtype=torch.uint8),
        "minimum": -torch.rand(n, groups) * 0.05,
    }


def prepare(route: str, w: dict):
    """Per-weight state for a route, and the float32 weight it should equal (the oracle)."""
    q8 = q.int8_linear(w["qweight"], w["scale"], "Q8_0").dequantized_weight()
    q4 = q.nibble_linear(w["packed"], w["scale"], w["minimum"], "Q4_1").dequantized_weight()
    if route == "f32":
        return q4.contiguous(), q4
    if route == "fbgemm":  # per-channel int8 of the Q4_1 weight, prepacked for fbgemm's AVX2 GEMM
        row_scale = (q4.abs().amax(1) / 127).double()
        qw = torch.quantize_per_channel(q4, row_scale, torch.zeros_like(row_scale, dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(qw, None), qw.dequantize()
    if route == "fbgemm_fp16":
        return torch.ops.quantized.linear_prepack_fp16(q4, None), q4.half().float()
    if route == "int8pack":  # per-channel: the oracle is its own per-row rounding
        row_scale = q8.abs().amax(1) / 127  # per output row
        qi = torch.round(q8 / row_scale[:, None]).to(torch.int8)
        return (qi, row_scale), qi.float() * row_scale[:, None]
    if route == "int4pack":
        nib = torch.cat([w["packed"] & 15, w["packed"] >> 4], -1).view(q4.shape).to(torch.int32)
        # torch's int4 dequantizes (q - 8) * scale + zero; Q4_1 is d * q + m, so zero = m + 8d.
        sz = torch.stack([w["scale"], w["minimum"] + 8 * w["scale"]], -1).transpose(0, 1).contiguous()
        return (torch._convert_weight_to_int4pack_for_cpu(nib, 1), sz), q4
    if route.startswith("q8"):
        return q.int8_linear(w["qweight"], w["scale"], "Q8_0").blocks(), q8
    return q.nibble_linear(w["packed"], w["scale"], w["minimum"], "Q4_1").blocks(), q4


def runner(route: str):
    if route == "f32":
        return lambda x, wt: torch.mm(wt, x.t()).t() if 2 <= x.shape[0] <= 128 else F.linear(x, wt)
    if route == "fbgemm":
        return lambda x, packed: torch.ops.quantized.linear_dynamic(x, packed, True)  # reduce_range for AVX2
    if route == "fbgemm_fp16":
        return lambda x, packed: torch.ops.quantized.linear_dynamic_fp16(x, packed)
    if route == "int8pack":
        return lambda x, s: torch._weight_int8pack_mm(x, *s)
    if route == "int4pack":
        return lambda x, s: torch._weight_int4pack_mm_for_cpu(x, s[0], q.BLOCK, s[1])
    matmul, dequantize = q._KERNELS["int8" if route.startswith("q8") else "int8+min"]
    if route.endswith("fused"):
        fn = q._compiled_kernel(matmul)
        return lambda x, s: fn(x, *s)
    dequant = q._compiled_kernel(dequantize)
    return lambda x, s: torch.mm(dequant(*s), x.t()).t()


class Stack(torch.nn.Module):
    """All linears of one SmolLM2 forward (30 layers + the LM head), each fed a fixed input."""

    def __init__(self, linears):
        super().__init__()
        self.linears = torch.nn.ModuleList(linears)

    def forward(self, inputs: dict[int, torch.Tensor]):
        return [linear(inputs[linear.in_features]) for linear in self.linears]


def build_stack(route: str, layers: int) -> torch.nn.Module:
    linears = []
    for n, k in LAYER * layers + [(49152, 576)]:
        w = random_weights(n, k)
        head = n == 49152
        if route.startswith("f32"):
            linear = torch.nn.Linear(k, n, bias=False)
            linear.weight.data = q.nibble_linear(w["packed"], w["scale"], w["minimum"], "Q4_1").dequantized_weight()
        elif route.startswith("int8") or head:
            linear = q.int8_linear(w["qweight"], w["scale"], "Q8_0", compiled="per-linear" in route)
        else:
            linear = q.nibble_linear(w["packed"], w["scale"], w["minimum"], "Q4_1", compiled="per-linear" in route)
        linears.append(linear)
    stack = Stack(linears)
    if route == "f32 eager":
        use_skinny_linears(stack)
    return torch.compile(stack, dynamic=False) if route.endswith("compiled") else stack


def stack_main(args) -> None:
    print(f"whole forward's linears ({args.layers} layers + LM head), ms per forward, median of {args.repeats}")
    print(f"{'route':>22} " + " ".join(f"{'rows ' + str(r):>9}" for r in args.rows))
    with torch.inference_mode():
        for route in args.stack_routes:
            stack = build_stack(route, args.layers)
            cells = []
            for rows in args.rows:
                inputs = {k: torch.randn(rows, k) for k in (576, 1536)}
                stack(inputs)
                times = []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    stack(inputs)
                    times.append(time.perf_counter() - start)
                cells.append(f"{statistics.median(times) * 1e3:>9.1f}")
            print(f"{route:>22} " + " ".join(cells), flush=True)


def smollm2_main(args) -> None:
    """Whole SmolLM2 forwards of `rows` tokens (the linears' shapes of a `rows`-sequence decode step)."""
    from transformers import AutoModelForCausalLM

    from transerve.engine.gguf_weights import use_gguf_linears
    from transerve.engine.models import bundled_gguf_path, materialize, resolve

    path = materialize(resolve(str(bundled_gguf_path())))
    print(f"SmolLM2-135M forward of N tokens (no KV cache), ms, median of {args.repeats} rounds; "
          f"routes alternate within a round so a shared box's noise hits them alike")
    routes = {}
    for route in ["f32 eager (skinny)", "f32 compiled", "Q4_1+Q8_0 per-linear", "Q4_1+Q8_0 compiled"]:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        if route.startswith("f32 eager"):
            use_skinny_linears(model)
        if route.startswith("Q4"):
            use_gguf_linears(model, str(bundled_gguf_path()), compiled="per-linear" in route)
        routes[route] = torch.compile(model, dynamic=False) if route.endswith("compiled") else model
    times = {(route, rows): [] for route in routes for rows in args.rows}
    with torch.inference_mode():
        for rows in args.rows:
            ids = torch.randint(0, 49152, (1, rows))
            for forward in routes.values():
                forward(input_ids=ids, use_cache=False, logits_to_keep=1)
            for _ in range(args.repeats):
                for route, forward in routes.items():
                    start = time.perf_counter()
                    forward(input_ids=ids, use_cache=False, logits_to_keep=1)
                    times[route, rows].append(time.perf_counter() - start)
    print(f"{'route':>26} " + " ".join(f"{'rows ' + str(r):>9}" for r in args.rows))
    for route in routes:
        print(f"{route:>26} " + " ".join(f"{statistics.median(times[route, r]) * 1e3:>9.1f}" for r in args.rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--routes", nargs="+", default=ROUTES, choices=ROUTES)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--copies", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--stack", action="store_true", help="time a whole forward's linears instead")
    parser.add_argument("--smollm2", action="store_true", help="time whole SmolLM2 forwards instead")
    parser.add_argument("--stack-routes", nargs="+", default=STACK_ROUTES, choices=STACK_ROUTES)
    parser.add_argument("--layers", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.stack:
        return stack_main(args)
    if args.smollm2:
        return smollm2_main(args)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats}, "
          f"microseconds per weight (error: max |route - dequantized f32|)")
    print(f"{'shape':>20} {'rows':>4} " + " ".join(f"{r:>14}" for r in args.routes))
    with torch.inference_mode():
        for name in args.shapes:
            n, k = SHAPES[name]
            copies = 1 if name.startswith("lm_head") else args.copies
            weights = [random_weights(n, k) for _ in range(copies)]
            prepared = {r: [prepare(r, w) for w in weights] for r in args.routes}
            for rows in args.rows:
                x = torch.randn(rows, k)
                cells = []
                for route in args.routes:
                    run = runner(route)
                    states = [s for s, _ in prepared[route]]
                    out = run(x, states[0])  # compiles
                    err = (out - F.linear(x, prepared[route][0][1])).abs().max().item()
                    times = []
                    for _ in range(args.repeats):
                        start = time.perf_counter()
                        for s in states:
                            run(x, s)
                        times.append((time.perf_counter() - start) / copies)
                    cells.append(f"{statistics.median(times) * 1e6:>7.0f} ({err:.0e})")
                print(f"{name:>20} {rows:>4} " + " ".join(f"{c:>14}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
