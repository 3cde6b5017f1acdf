"""Offline throughput of the engine alone (no HTTP), or of transformers' own continuous batching.

A randomly initialised Qwen2.5-0.5B-shaped model; N requests with prompts of random tokens (64 to 512
long by default) and a fixed number of output tokens each, end-of-sequence ignored; prints output
tokens/s. The same inputs go to either engine.

    PYTHONPATH=. python bench/offline_throughput.py                      # transerve, 512 requests
    PYTHONPATH=. python bench/offline_throughput.py --engine hf          # transformers generate_batch
    PYTHONPATH=. python bench/offline_throughput.py --batch-1            # one request: latency-bound speed
    PYTHONPATH=. python bench/offline_throughput.py --nano-vllm-shape    # 256 requests, 100-1024 in and out (issue 15)
    PYTHONPATH=. python bench/offline_throughput.py --tiny --num-requests 4 --output-len 8   # CPU smoke test
    PYTHONPATH=. python bench/offline_throughput.py --model SmolLM2-135M-Instruct --num-requests 32   # a real model

Imports only transerve.config / engine / kernels (never the HTTP stack), so it runs on a bare GPU image.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root

from transerve.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from transerve.engine.core import EngineCore, generate  # noqa: E402
from transerve.engine.attention import ATTN_IMPLEMENTATION, register_attention  # noqa: E402
from transerve.engine.kv_sizing import kv_bytes_per_block, kv_shape  # noqa: E402
from transerve.engine.model_runner import ModelRunner  # noqa: E402
from transerve.engine.models import load_model  # noqa: E402
from transerve.engine.request import Request, SamplingParams  # noqa: E402


def model_config(tiny: bool):
    from transformers import Qwen2Config

    if tiny:
        return Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, vocab_size=1000, max_position_embeddings=2048,
                           tie_word_embeddings=True)
    return Qwen2Config(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768,
                       tie_word_embeddings=True, rope_theta=1000000.0)


def build_model(config, attn_implementation: str, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # initialise in place: no 2 GB round trip through the CPU
        # from_config writes the attention implementation into the config: give it its own copy.
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()


def make_prompts(args, vocab_size: int) -> list[list[int]]:
    rng = random.Random(args.seed)
    return [[rng.randrange(vocab_size) for _ in range(rng.randint(args.input_len_min, args.input_len_max))]
            for _ in range(args.num_requests)]


def output_lens(args) -> list[int]:
    """Each request's output length: --output-len, or uniform in [--output-len-min, --output-len] when set."""
    rng = random.Random(args.seed + 1)
    low = args.output_len_min or args.output_len
    return [rng.randint(low, args.output_len) for _ in range(args.num_requests)]


def num_kv_blocks(model, args, device: torch.device, max_tokens: int) -> int:
    """All the KV cache the workload could use, within `gpu_memory_utilization` of free device memory."""
    needed = -(-max_tokens // args.block_size) + 1
    if device.type != "cuda":
        return needed
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    # The rest of free memory is for activations: max_num_batched_tokens of hidden states, MLP, logits.
    affordable = int(free * args.gpu_memory_utilization) // kv_bytes_per_block(model, args.block_size)
    return min(needed, affordable)


def load_served_model(spec: str, device: torch.device, dtype: torch.dtype, quantization: str = "none"):
    """A model as the server loads it (GGUF conversion, quantized weights and CPU linears included)."""
    from transerve.engine import models

    path = models.materialize(models.resolve(spec))
    return load_model(path, EngineConfig(device=str(device), dtype=str(dtype)[6:], quantization=quantization), device, dtype)


def run_transerve(args, config, prompts, device, dtype) -> tuple[float, int]:
    register_attention()
    model = load_served_model(args.model, device, dtype) if args.model else build_model(config, ATTN_IMPLEMENTATION, device, dtype)
    config = model.config
    max_model_len = args.input_len_max + args.output_len
    max_tokens = min(args.num_requests, args.max_num_seqs) * max_model_len
    blocks = num_kv_blocks(model, args, device, max_tokens)
    engine_config = EngineConfig(device=str(device), dtype=str(dtype)[6:], enforce_eager=device.type == "cpu" and not args.compile,
                                 cache=CacheConfig(block_size=args.block_size, num_kv_blocks=blocks))
    runner = ModelRunner(model, engine_config, blocks, max_model_len)
    if args.compile and device.type == "cpu":  # as a server would, but before timing: saved steps, or compile now
        runner.graphs.load_saved()
        runner.graphs.compile_buckets()
    if device.type == "cuda":
        from transerve.kernels.paged_attention import precompile

        num_heads, num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        precompile(num_heads, num_kv_heads, kv_shape(config)[1], args.block_size, dtype, device)
    scheduler = SchedulerConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    params = [SamplingParams(max_tokens=n, temperature=args.temperature, ignore_eos=True) for n in output_lens(args)]

    def requests(batch, tag, params=params):
        return [Request(f"{tag}{i}", p, params[i % len(params)], seed=i) for i, p in enumerate(batch)]

    # Warm up: the allocator, cuBLAS, and the kernels at the batch shapes precompile doesn't cover.
    warm = [p[:64] for p in prompts[: min(len(prompts), args.max_num_seqs, 32)]]
    warm_params = SamplingParams(max_tokens=8, temperature=args.temperature, ignore_eos=True)
    generate(EngineCore(scheduler, blocks, args.block_size, max_model_len), runner, requests(warm, "warm", [warm_params]))
    sync(device)
    print(f"transerve: {blocks} KV blocks of {args.block_size} tokens; max_num_seqs {args.max_num_seqs}, "
          f"max_num_batched_tokens {args.max_num_batched_tokens}", flush=True)
    core = EngineCore(scheduler, blocks, args.block_size, max_model_len, enable_prefix_caching=False)
    start = time.perf_counter()
    outputs = generate(core, runner, requests(prompts, "r"))
    sync(device)
    return time.perf_counter() - start, sum(len(o) for o in outputs.values())


def run_hf(args, config, prompts, device, dtype) -> tuple[float, int]:
    from transformers import GenerationConfig

    model = build_model(config, "sdpa", device, dtype)
    generation_config = GenerationConfig(max_new_tokens=args.output_len, do_sample=args.temperature > 0,
                                         temperature=args.temperature or None, eos_token_id=-1, pad_token_id=0)
    # Warm up (CUDA graphs, allocator) on a few short requests first, as for our engine.
    model.generate_batch([p[:64] for p in prompts[:8]], generation_config=generation_config, progress_bar=False)
    sync(device)
    start = time.perf_counter()
    results = model.generate_batch(prompts, generation_config=generation_config, progress_bar=False)
    sync(device)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(r.generated_tokens) for r in results.values())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=("transerve", "hf"), default="transerve")
    parser.add_argument("--num-requests", type=int, default=512)
    parser.add_argument("--input-len-min", type=int, default=64)
    parser.add_argument("--input-len-max", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--output-len-min", type=int, default=0, help="random output lengths from this to --output-len "
                        "(transerve engine only; default: all --output-len)")
    parser.add_argument("--nano-vllm-shape", action="store_true",
                        help="nano-vllm's benchmark: 256 requests, prompts and outputs of 100-1024 random tokens")
    parser.add_argument("--batch-1", action="store_true", help="a single request (prompt 128 tokens unless set)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="fraction of free memory for KV")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true", help="a tiny model of the same family (CPU smoke tests)")
    parser.add_argument("--model", help="a model spec the server accepts (repo id, directory, GGUF, SmolLM2-135M-Instruct) "
                        "instead of a random model; transerve engine only")
    parser.add_argument("--compile", action="store_true", help="on CPU, compiled decode steps (engine/compiled_step.py)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", help="append one JSON line with the result")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # the compile progress lines
    if args.nano_vllm_shape:
        args.num_requests, args.input_len_min, args.input_len_max = 256, 100, 1024
        args.output_len_min, args.output_len = 100, 1024
    if args.output_len_min and args.engine == "hf":
        parser.error("--output-len-min / --nano-vllm-shape: generate_batch takes one max_new_tokens for all requests")
    if args.batch_1:
        args.num_requests = 1
        args.input_len_min = args.input_len_max = 128 if args.input_len_max == 512 else args.input_len_max
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = model_config(args.tiny)
    if args.model:
        from transformers import AutoConfig
        from transerve.engine import models

        config = AutoConfig.from_pretrained(models.materialize(models.resolve(args.model)))
    prompts = make_prompts(args, config.vocab_size)
    run = run_transerve if args.engine == "transerve" else run_hf
    elapsed, generated = run(args, config, prompts, device, dtype)
    expected = sum(output_lens(args))
    label = f"{args.engine}{' batch-1' if args.batch_1 else ''}{' nano-vllm shape' if args.nano_vllm_shape else ''}"
    outputs = f"{args.output_len_min}-{args.output_len}" if args.output_len_min else f"{args.output_len}"
    print(f"{label}: {args.num_requests} requests, prompts {args.input_len_min}-{args.input_len_max} tokens, outputs {outputs}: "
          f"{generated} output tokens (expected {expected}) in {elapsed:.2f} s: "
          f"{generated / elapsed:,.1f} output tokens/s, "
          f"{(generated + sum(map(len, prompts))) / elapsed:,.1f} total tokens/s", flush=True)
    if args.json_out:
        with open(args.json_out, "a") as f:
            f.write(json.dumps(dict(engine=label, requests=args.num_requests, output_tokens=generated,
                                    seconds=elapsed, output_tokens_per_s=generated / elapsed,
                                    device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu")) + "\n")


if __name__ == "__main__":
    main()
