"""Where a CPU decode step's time goes: linears, attention, the rest of the ops, Python, sampling.

    PYTHONPATH=. python bench/profile_step.py --batch 1            # SmolLM2-135M-Instruct, its GGUF's weights
    PYTHONPATH=. python bench/profile_step.py --batch 1 --quantization none    # float32
    PYTHONPATH=. python bench/profile_step.py --batch 32 --compiled

Prefills `--batch` requests of 128 random tokens, then times `--steps` decode steps (median) and profiles
a few with torch.profiler. The split: the model's forward (hooked) vs the rest of `execute` (packing,
sampling); within the forward, each op family's self time, and what no op accounts for (Python, dispatch).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transerve.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from transerve.engine.core import EngineCore  # noqa: E402
from transerve.engine import compiled_step, model_runner, models  # noqa: E402
from transerve.engine.models import load_model  # noqa: E402
from transerve.engine.model_runner import ModelRunner  # noqa: E402
from transerve.engine.request import Request, SamplingParams  # noqa: E402

FAMILIES = {
    "linears": ("quantized::linear_dynamic", "aten::mm", "aten::addmm", "aten::linear", "aten::matmul", "mkl", "mkldnn"),
    "attention": ("aten::index_select", "aten::baddbmm", "aten::bmm", "aten::_softmax", "aten::softmax",
                  "aten::index_copy_", "aten::scaled_dot_product_attention"),
    "compiled graph": ("Torch-Compiled Region", "CompiledFunction", "cpp_fused", "## Call CompiledFxGraph"),
}


def family(name: str) -> str:
    for fam, prefixes in FAMILIES.items():
        if any(name.startswith(p) for p in prefixes):
            return fam
    return "norms/rope/act/other ops"


def timed(owner, name: str, into: list[float]) -> None:
    """Wrap `owner.name` so that each call's wall time lands in `into`."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - t0)

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--compiled", action="store_true", help="the compiled decode step (engine/compiled_step.py)")
    parser.add_argument("--max-compiled-batch", type=int, default=compiled_step.MAX_COMPILED_BATCH,
                        help="the largest compiled bucket (with --compiled)")
    parser.add_argument("--quantization", default="none", choices=["none", "gguf", "int8"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--kernel-profile", action="store_true",
                        help="name inductor's C++ kernels in the profile (a different compile: not cached with the server's)")
    parser.add_argument("--rows", type=int, default=12, help="rows of the per-op table")
    args = parser.parse_args()
    if args.kernel_profile:
        torch._inductor.config.cpp.enable_kernel_profile = True
    compiled_step.MAX_COMPILED_BATCH = args.max_compiled_batch
    device = torch.device("cpu")
    torch.set_num_threads(args.threads)
    path = models.materialize(models.resolve(args.model))
    model = load_model(path, EngineConfig(device="cpu", dtype="float32", quantization=args.quantization), device, torch.float32)
    blocks, block_size, max_len = args.batch * 12 + 1, 16, 128 + args.steps + 64
    config = EngineConfig(device="cpu", dtype="float32", enforce_eager=not args.compiled,
                          cache=CacheConfig(block_size=block_size, num_kv_blocks=blocks),
                          scheduler=SchedulerConfig(max_num_seqs=max(args.batch, 1), max_num_batched_tokens=8192))
    runner = ModelRunner(model, config, blocks, max_len)
    if args.compiled:  # the buckets saved by an earlier run, or compiled (and saved) now
        start = time.perf_counter()
        loaded = runner.graphs.load_saved()
        runner.graphs.compile_buckets()
        print(f"compiled steps: loaded {loaded}, compiled {sorted(set(runner.graphs.steps) - set(loaded))} "
              f"in {time.perf_counter() - start:.1f} s (saved under {runner.graphs.artifacts})")
    core = EngineCore(config.scheduler, blocks, block_size, max_len)
    rng = random.Random(0)
    params = SamplingParams(max_tokens=args.steps + 20, temperature=0.0, ignore_eos=True)
    for i in range(args.batch):
        core.add_request(Request(f"r{i}", [rng.randrange(model.config.vocab_size) for _ in range(128)], params, seed=i))

    forward_s = []
    parts: dict[str, list[float]] = defaultdict(list)  # host-side split of a step, by wall time
    if not args.compiled:  # hooks with Python timers would break the compiled graph
        model.register_forward_pre_hook(lambda *a: forward_s.append(-time.perf_counter()))
        model.register_forward_hook(lambda *a: forward_s.__setitem__(-1, forward_s[-1] + time.perf_counter()))
    else:
        timed(runner.graphs, "run", parts["graph run (inputs, guards, graph)"])
    timed(runner, "prepare", parts["runner prepare"])
    timed(model_runner, "sample_step", parts["sampling"])
    timed(runner, "execute", parts["runner execute"])

    cpu_s: list[float] = []  # process CPU time per step: on a shared box, steadier than wall time

    def step() -> float:
        t0, c0 = time.perf_counter(), time.process_time()
        sched, scheduled = core.schedule()
        core.apply(sched, runner.execute(scheduled))
        cpu_s.append(time.process_time() - c0)
        return time.perf_counter() - t0

    for _ in range(5):  # prefill, then warm decodes
        step()
    forward_s.clear()
    for v in parts.values():
        v.clear()
    cpu_s.clear()
    wall = [step() for _ in range(args.steps)]
    cpu = sorted(cpu_s)
    fwd = statistics.median(forward_s) if forward_s else float("nan")
    print(f"batch {args.batch}{' compiled' if args.compiled else ''}: step median {statistics.median(wall) * 1e3:.1f} ms "
          f"(min {min(wall) * 1e3:.1f}, max {max(wall) * 1e3:.1f}), model forward median {fwd * 1e3:.1f} ms, "
          f"{args.batch / statistics.median(wall):.1f} tokens/s; CPU time per step median {statistics.median(cpu) * 1e3:.1f} ms "
          f"(min {cpu[0] * 1e3:.1f}; {args.threads} threads)")
    for name, times in parts.items():
        if times:
            print(f"  {name:28s} median {statistics.median(times) * 1e3:7.2f} ms")
    if forward_s:
        print(f"  {'model forward (eager)':28s} median {fwd * 1e3:7.2f} ms")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        n = 5
        for _ in range(n):
            step()
        prof_wall = (time.perf_counter() - t0) / n
    self_us: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for evt in prof.key_averages():
        self_us[family(evt.key)] += evt.self_cpu_time_total / n
        count[family(evt.key)] += evt.count // n
    ops = sum(self_us.values()) / 1e3
    print(f"profiled step {prof_wall * 1e3:.1f} ms (profiler overhead included); op self time by family:")
    for fam, us in sorted(self_us.items(), key=lambda kv: -kv[1]):
        print(f"  {fam:28s} {us / 1e3:7.1f} ms  {count[fam]:5d} ops")
    print(f"  {'not in ops (Python etc.)':28s} {prof_wall * 1e3 - ops:7.1f} ms")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
