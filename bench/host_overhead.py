"""Host overhead of the engine and of the serving stack, measured around a model that costs nothing.

    PYTHONPATH=. python bench/host_overhead.py engine            # per-phase us per decode step, batch 1/64/256
    PYTHONPATH=. python bench/host_overhead.py serve             # server CPU us per streamed token, 256 clients
    PYTHONPATH=. python bench/host_overhead.py engine --profile  # and cProfile's top items at the last batch

The model is bench/zero_cost_model.py: a real ModelRunner runs it (update_states, pack_step, tensors,
logits_to_keep, sample_step on the real sampling kernel, record_samples); only the HF forward with our
paged attention is replaced by one scatter into zeroed logits. `engine` times each phase of a decode step
separately (the detokenizer's per-token work and a chat chunk's shaping and SSE encoding included) and
prints medians over the steps, median of `--runs` runs. `serve` lives in bench/host_overhead_serve.py.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import statistics
import sys
import time
from pathlib import Path

import anyio
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent))

import zero_cost_model  # noqa: E402
from transerve.actors import detokenizer  # noqa: E402
from transerve.actors.messages import OpenStream  # noqa: E402
from transerve.actors.scheduler import _new_token  # noqa: E402
from transerve.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from transerve.engine import model_runner  # noqa: E402
from transerve.engine.core import EngineCore  # noqa: E402
from transerve.engine.model_runner import ModelRunner  # noqa: E402
from transerve.engine.request import Request, SamplingParams  # noqa: E402
from transerve.http.chat import ChatStream  # noqa: E402

PHASES = ("schedule", "inputs", "model", "sampling", "sample kernel", "apply", "detokenize", "stream")
ENGINE = ("schedule", "inputs", "sampling", "apply")  # the "engine host overhead, excluding the model"
TARGETS_US = {1: 300.0, 256: 1000.0}
PROMPT_LEN = 32


# The thread's CPU time, not the wall clock: on a shared box a wall-clock step of a few ms is cut by other
# processes' time slices often enough to swamp the medians. Everything measured runs on this thread.
cpu_now = time.thread_time


class Clock:
    """Accumulates time per phase for the current step; `timed` wraps a callable into a phase."""

    def __init__(self) -> None:
        self.now: dict[str, float] = {}

    def add(self, phase: str, seconds: float) -> None:
        self.now[phase] = self.now.get(phase, 0.0) + seconds

    def timed(self, phase: str, fn):
        def wrapper(*args, **kwargs):
            start = cpu_now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(phase, cpu_now() - start)
        return wrapper


CLOCK = Clock()


def instrument_module() -> None:
    """Once per process: sample_step and record_samples, as ModelRunner.execute looks them up."""
    for name in ("sample_step", "record_samples"):
        setattr(model_runner, name, CLOCK.timed("sampling", getattr(model_runner, name)))


def instrument(runner: ModelRunner) -> None:
    """The model call and the sampling kernel inside execute; 'inputs' is what execute spends besides
    them and sampling."""
    runner.model = CLOCK.timed("model", runner.model)
    runner.sample = CLOCK.timed("sample kernel", runner.sample)


async def measure(batch: int, steps: int, vocab: int, tokenizer, profile: bool) -> dict[str, float]:
    """Median microseconds per decode step for each phase, plus 'engine' (the ENGINE phases) and 'total'."""
    max_tokens = steps + 16
    blocks_per_seq = -(-(PROMPT_LEN + max_tokens) // 16)
    num_blocks = batch * blocks_per_seq + 1
    config = EngineConfig(device="cpu", dtype="float32", cache=CacheConfig(num_kv_blocks=num_blocks))
    runner = ModelRunner(zero_cost_model.build_model(vocab), config, num_blocks, PROMPT_LEN + max_tokens)
    clock = CLOCK
    instrument(runner)
    core = EngineCore(SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=8192), num_blocks, 16,
                      PROMPT_LEN + max_tokens, enable_prefix_caching=False)
    rng = random.Random(batch)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    texts = detokenizer.TokenTexts(tokenizer)
    streams, receivers, shapes = {}, {}, {}
    for i in range(batch):
        request_id = f"r{i}"
        prompt = [rng.randrange(zero_cost_model.FIRST_TOKEN, vocab) for _ in range(PROMPT_LEN)]
        core.add_request(Request(request_id, prompt, params, seed=i, eos_token_ids=frozenset({2})))
        send, receivers[request_id] = anyio.create_memory_object_stream(max_tokens + 2)
        streams[request_id] = detokenizer.open_stream(texts, OpenStream(request_id, (), send))
        meta = {"id": f"chatcmpl-{i}", "created": 0, "model": "zero-cost"}
        shapes[request_id] = ChatStream(meta, 1, include_usage=True, logprobs=False)
    rows: list[dict[str, float]] = []
    profiler = cProfile.Profile() if profile else None
    while len(rows) < steps:
        clock.now = {}
        decode = all(core.requests[r].num_output_tokens > 0 for r in streams)  # every prefill is done
        if decode and profiler:
            profiler.enable()
        start = cpu_now()
        step, scheduled = core.schedule()
        clock.add("schedule", cpu_now() - start)
        start = cpu_now()
        sampled = runner.execute(scheduled)
        clock.add("execute", cpu_now() - start)
        start = cpu_now()
        outputs = core.apply(step, sampled)
        clock.add("apply", cpu_now() - start)
        start = cpu_now()
        for out in outputs:  # as the scheduler actor hands them over, then the detokenizer actor's work
            token = _new_token(out, sampled.logprobs.get(out.request_id))
            await detokenizer._on_token(streams[out.request_id], token, texts)
        clock.add("detokenize", cpu_now() - start)
        start = cpu_now()
        for out in outputs:  # shaping each chat chunk and its SSE frame, as the handler's stream does
            receiver, shape = receivers[out.request_id], shapes[out.request_id]
            while True:  # the detokenizer sends nothing for a token whose text is held back
                try:
                    event = receiver.receive_nowait()
                except anyio.WouldBlock:
                    break
                shape.delta(event)
        clock.add("stream", cpu_now() - start)
        if profiler:
            profiler.disable()
        if decode:
            now = clock.now
            now["inputs"] = now.pop("execute") - now.get("model", 0.0) - now.get("sampling", 0.0)
            now["sampling"] = now.get("sampling", 0.0) - now.get("sample kernel", 0.0)
            rows.append(now)
    if profiler:
        print(f"\ncProfile, {steps} decode steps at batch {batch}, top 25 by own time:")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        print("transerve's functions by cumulative time:")
        pstats.Stats(profiler).sort_stats("cumulative").print_stats("transerve/", 25)
    medians = {p: statistics.median(r.get(p, 0.0) for r in rows) * 1e6 for p in PHASES}
    medians["engine"] = statistics.median(sum(r.get(p, 0.0) for p in ENGINE) for r in rows) * 1e6
    medians["total"] = statistics.median(sum(r.get(p, 0.0) for p in PHASES if p != "model") for r in rows) * 1e6
    return medians


def print_table(batches: list[int], runs: list[dict[int, dict[str, float]]]) -> None:
    """Median of the runs' medians; min-max over the runs beside it when there are several."""
    labels = {"inputs": "inputs (update_states, pack_step, tensors)", "model": "model call (subtracted)",
              "sampling": "sampling bookkeeping (sample_step, record)", "sample kernel": "sampling kernel (CPU reference)",
              "apply": "apply (core.apply)", "detokenize": "detokenize (NewToken, _on_token)",
              "stream": "stream (chat chunk + SSE)", "engine": "ENGINE HOST (schedule+inputs+sampling+apply)",
              "total": "all host work (everything but the model)"}
    print(f"\nCPU microseconds per decode step (thread CPU time; median over steps, median of {len(runs)} run(s), [min-max over runs])")
    print(f"{'phase':46}" + "".join(f"{'batch ' + str(b):>26}" for b in batches))
    for phase in (*PHASES, "engine", "total"):
        cells = []
        for b in batches:
            values = sorted(run[b][phase] for run in runs)
            spread = f" [{values[0]:.0f}-{values[-1]:.0f}]" if len(values) > 1 else ""
            cells.append(f"{statistics.median(values):.0f}{spread}")
        print(f"{labels.get(phase, phase):46}" + "".join(f"{c:>26}" for c in cells))
    per_token = [statistics.median(run[b]["total"] for run in runs) / b for b in batches]
    print(f"{'all host work per token':46}" + "".join(f"{v:>26.1f}" for v in per_token))
    for b, target in TARGETS_US.items():
        if b in batches:
            got = statistics.median(run[b]["engine"] for run in runs)
            print(f"target: engine host at batch {b} <= {target:.0f} us: {got:.0f} us, {'met' if got <= target else 'NOT met'}")


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        import host_overhead_serve

        return host_overhead_serve.main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("engine", "serve"), help="serve: see bench/host_overhead_serve.py --help")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--steps", type=int, default=200, help="decode steps measured per batch size")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=1024, help="logits' width (the sampling kernel's work)")
    parser.add_argument("--profile", action="store_true", help="cProfile the last batch size's steps (one run)")
    args = parser.parse_args()
    instrument_module()
    torch.set_num_threads(1)  # host work is single-threaded; keep the CPU reference kernels off other cores
    tokenizer = zero_cost_model.smollm2_tokenizer()
    runs = []
    for run in range(1 if args.profile else args.runs):
        runs.append({b: anyio.run(measure, b, args.steps, args.vocab, tokenizer, args.profile and b == args.batches[-1])
                     for b in args.batches})
    print_table(args.batches, runs)


if __name__ == "__main__":
    main()
