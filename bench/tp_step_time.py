"""Decode step time with tensor parallelism (--tensor-parallel-size N) against one rank, on CPU or CUDA.

Builds a random Llama of a given shape in a temporary Hugging Face cache (nothing is downloaded), loads
it through transerve's own loader at each size, prefills a batch, and times the decode steps
(rank 0's `execute`: sending the step, every rank's forward with its all-reduces, sampling).

    python bench/tp_step_time.py --tp 1 2 --batch 1 32 --device cpu
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def build_model(root: Path, args) -> str:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from transerve.engine import models

    os.environ["HF_HOME"] = str(root)
    os.environ["HF_HUB_OFFLINE"] = "1"
    work = root / "model"
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=49152,
                         max_position_embeddings=2048, architectures=["LlamaForCausalLM"])
    LlamaForCausalLM(config).save_pretrained(work)
    AutoTokenizer.from_pretrained(models.materialize(models.resolve(models.DEFAULT_MODEL))).save_pretrained(work)
    return str(work)


def step_times(path: str, tp: int, batch: int, args) -> list[float]:
    from transerve.actors.assembly import load
    from transerve.config import CacheConfig, EngineConfig, SchedulerConfig
    from transerve.engine.request import Request, SamplingParams

    config = EngineConfig(device=args.device, tensor_parallel_size=tp, enforce_eager=True,
                          cache=CacheConfig(num_kv_blocks=batch * 8 + 8),
                          scheduler=SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=4096))
    loaded = load(path, config, allow_download=False)
    try:
        params = SamplingParams(max_tokens=args.steps + 2, temperature=0.0, ignore_eos=True)
        for i in range(batch):
            loaded.core.add_request(Request(str(i), list(range(3, 3 + args.prompt)), params, seed=0))
        times = []
        while loaded.core.has_work():
            step, scheduled = loaded.core.schedule()
            start = time.perf_counter()
            sampled = loaded.runner.execute(scheduled)
            if scheduled.num_tokens == scheduled.num_requests == batch:  # a pure decode step
                times.append(time.perf_counter() - start)
            loaded.core.apply(step, sampled)
        return times[2:]  # the first steps warm caches and allocators
    finally:
        if tp > 1:
            loaded.runner.ranks.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    parser.add_argument("--steps", type=int, default=20, help="decode steps per request")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tp-bench-") as root:
        path = build_model(Path(root), args)
        print(f"random Llama hidden {args.hidden}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, "
              f"device {args.device}, {os.cpu_count()} cores")
        print(f"{'tp':>3} {'batch':>5} {'median ms/step':>15} {'p90':>8}")
        for batch in args.batch:
            for tp in args.tp:
                times = sorted(step_times(path, tp, batch, args))
                print(f"{tp:>3} {batch:>5} {statistics.median(times) * 1e3:>15.1f} {times[int(len(times) * 0.9)] * 1e3:>8.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
