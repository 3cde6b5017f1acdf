"""`F.linear` vs SkinnyLinear (`W @ x^T`) over SmolLM2-135M's linear shapes on CPU, by batch rows.

    python bench/cpu_linear.py [--rows 1 2 4 8 16 32 64 128 256]

Weights are 30 layers' worth plus the tied LM head, so they stream from memory as in a real step
(one layer's weights would sit in cache and flatter both). Prints the median of --repeats runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from transerve.engine.cpu_linear import SkinnyLinear  # noqa: E402

LAYER_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    shapes = LAYER_SHAPES * args.layers + [(49152, 576)]  # + the tied LM head
    plain = [torch.nn.Linear(n_in, n_out, bias=False) for n_out, n_in in shapes]
    skinny = [SkinnyLinear(n_in, n_out, bias=False) for n_out, n_in in shapes]
    for a, b in zip(plain, skinny):
        b.weight = a.weight

    def step(rows: int, linears) -> float:
        inputs = {n: torch.randn(1, rows, n) for n in (576, 1536)}
        start = time.perf_counter()
        for linear in linears:
            linear(inputs[linear.in_features])
        return time.perf_counter() - start

    print(f"{'rows':>5} {'F.linear ms':>12} {'W @ x^T ms':>11} {'speed-up':>9}   (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads)")
    with torch.inference_mode():
        for rows in args.rows:
            base = statistics.median(step(rows, plain) for _ in range(args.repeats))
            fast = statistics.median(step(rows, skinny) for _ in range(args.repeats))
            print(f"{rows:>5} {base * 1e3:>12.1f} {fast * 1e3:>11.1f} {base / fast:>8.2f}x")


if __name__ == "__main__":
    main()
