"""Kernel microbenchmarks: each Triton kernel against its torch reference, and paged attention against
torch SDPA on contiguous KV, with achieved bandwidth as a fraction of the card's measured copy bandwidth.

    PYTHONPATH=. python bench/kernel_bench.py [--sweep] [--json-out FILE]

Without CUDA it runs tiny shapes under Triton's interpreter, to check the script itself: the times
mean nothing there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from transerve.kernels import kv_cache, paged_attention, reference, sampling  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")


def timeit(fn) -> float:
    """Seconds per call (median, L2 flushed between calls on CUDA)."""
    if CUDA:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3
    fn()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy (read + write), the ceiling the kernels are judged against."""
    n = (1 << 30) if CUDA else (1 << 22)
    src = torch.empty(n, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * n / timeit(lambda: dst.copy_(src))


def paged_inputs(num_seqs, q_len, context, num_heads, num_kv_heads, head_dim, block_size, dtype):
    """A packed batch over a cache with randomly permuted blocks, plus the same K/V contiguous for SDPA."""
    seq_len = context + q_len
    blocks_per_seq = -(-seq_len // block_size)
    num_blocks = num_seqs * blocks_per_seq
    tables = torch.randperm(num_blocks, device=DEVICE).view(num_seqs, blocks_per_seq).to(torch.int32)
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device=DEVICE).to(dtype)
    v_cache = torch.randn_like(k_cache)
    query = torch.randn(1, num_heads, num_seqs * q_len, head_dim, device=DEVICE).to(dtype)[0].transpose(0, 1)
    seq_lens = torch.full((num_seqs,), seq_len, dtype=torch.int32, device=DEVICE)
    qsl = torch.arange(num_seqs + 1, dtype=torch.int32, device=DEVICE) * q_len

    def contiguous(cache):  # [num_seqs, kv_heads, seq_len, head_dim]
        return cache[tables.long()].flatten(1, 2)[:, :seq_len].transpose(1, 2).contiguous()

    return (query, k_cache, v_cache, tables, seq_lens, qsl, head_dim ** -0.5), contiguous(k_cache), contiguous(v_cache)


def attention_rows(name, num_seqs, q_len, context, num_heads, num_kv_heads, head_dim, block_size, dtype, sweep):
    args, k, v = paged_inputs(num_seqs, q_len, context, num_heads, num_kv_heads, head_dim, block_size, dtype)
    query = args[0]
    seq_len = context + q_len
    elem = k.element_size()
    kv_bytes = 2 * num_seqs * seq_len * num_kv_heads * head_dim * elem
    io_bytes = kv_bytes + 2 * query.numel() * elem  # K/V once, Q in, O out
    causal_pairs = num_seqs * (q_len * context + q_len * (q_len + 1) / 2)
    flops = 4 * causal_pairs * num_heads * head_dim
    shape = f"{num_seqs}x(q{q_len}+ctx{context}) {num_heads}q/{num_kv_heads}kv d{head_dim} bs{block_size} {str(dtype)[6:]}"
    q_sdpa = query.transpose(0, 1).reshape(num_heads, num_seqs, q_len, head_dim).transpose(0, 1)
    impls = {
        "triton paged (auto)": lambda: paged_attention.paged_attention(*args),
        "torch SDPA, contiguous KV": lambda: F.scaled_dot_product_attention(
            q_sdpa, k, v, is_causal=q_len > 1 and context == 0, scale=args[-1], enable_gqa=True),
        "torch reference, paged": lambda: reference.paged_attention_ref(*args),
    }
    if sweep and CUDA:
        for splits in (1, 2, 4, 8, 16) if q_len == 1 else (1,):
            for tile in (32, 64, 128):
                impls[f"triton splits={splits} tile={tile}"] = (
                    lambda s=splits, t=tile: paged_attention.launch(*args, num_splits=s, tile=t))
        for warps in (2, 4, 8):
            for stages in (2, 3, 4):
                impls[f"triton auto warps={warps} stages={stages}"] = (
                    lambda w=warps, s=stages: paged_attention.launch(*args, num_warps=w, num_stages=s))
    expected = impls["torch reference, paged"]().float()
    rows = []
    for impl, fn in impls.items():
        note = ""
        if impl.startswith("triton"):  # a fast wrong kernel is no result: say so next to its time
            err = (fn().float() - expected).abs().max().item()
            note = f"max err {err:.1e}" + (" MISMATCH" if not err < 3e-2 else "")
        seconds = timeit(fn)
        rows.append(dict(kernel=name, shape=shape, impl=impl, seconds=seconds, bytes=io_bytes,
                         tflops=flops / seconds / 1e12, note=note))
    return rows


def write_kv_rows(num_tokens, num_kv_heads, head_dim, dtype):
    num_blocks = max(1024, 2 * num_tokens // 16)
    key = torch.randn(1, num_kv_heads, num_tokens, head_dim, device=DEVICE).to(dtype)[0].transpose(0, 1)
    value = torch.randn_like(key)
    caches = [torch.zeros(num_blocks, 16, num_kv_heads, head_dim, dtype=dtype, device=DEVICE) for _ in range(2)]
    slots = torch.randperm(num_blocks * 16, device=DEVICE)[:num_tokens]
    shape = f"{num_tokens} tokens {num_kv_heads}kv d{head_dim} {str(dtype)[6:]}"
    io_bytes = 4 * key.numel() * key.element_size()  # K and V, read and written
    return [
        dict(kernel="write_kv", shape=shape, impl=impl, seconds=timeit(lambda f=f: f(key, value, *caches, slots)),
             bytes=io_bytes)
        for impl, f in (("triton", kv_cache.write_kv), ("torch reference", reference.write_kv_ref))
    ]


def sample_rows(num_seqs, vocab):
    logits = torch.randn(num_seqs, vocab, device=DEVICE) * 3
    rows = []
    for label, t, k, p in (("greedy", 0.0, 0, 1.0), ("T=0.8", 0.8, 0, 1.0), ("T=0.8 top-k 50 top-p 0.9", 0.8, 50, 0.9)):
        params = (torch.full((num_seqs,), t, device=DEVICE), torch.full((num_seqs,), k, dtype=torch.int32, device=DEVICE),
                  torch.full((num_seqs,), p, device=DEVICE), torch.zeros(num_seqs, device=DEVICE),
                  torch.arange(num_seqs, device=DEVICE), torch.zeros(num_seqs, dtype=torch.long, device=DEVICE))
        differ = (sampling.sample(logits, *params) != reference.sample_ref(logits, *params)).sum().item()
        for impl, f in (("triton", sampling.sample), ("torch reference", reference.sample_ref)):
            rows.append(dict(kernel="sample", shape=f"{num_seqs}x{vocab} {label}", impl=impl,
                             seconds=timeit(lambda f=f: f(logits, *params)), bytes=logits.numel() * 4,
                             note=f"{differ} rows differ" if impl == "triton" else ""))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", action="store_true", help="also time paged attention's tuning knobs")
    parser.add_argument("--json-out", help="write the rows (and the copy bandwidth) here")
    args = parser.parse_args()
    torch.manual_seed(0)
    if not CUDA:
        print("no CUDA: tiny shapes under TRITON_INTERPRET=1, to check the script; the times mean nothing")
    bandwidth = copy_bandwidth()
    bf16 = torch.bfloat16
    if CUDA:
        rows = attention_rows("paged attention decode", 64, 1, 4095, 14, 2, 64, 16, bf16, args.sweep)
        rows += attention_rows("paged attention decode", 4, 1, 32767, 14, 2, 64, 16, bf16, args.sweep)
        rows += attention_rows("paged attention prefill", 4, 2048, 0, 14, 2, 64, 16, bf16, False)
        rows += write_kv_rows(64, 2, 64, bf16) + write_kv_rows(8192, 2, 64, bf16)
        rows += sample_rows(64, 151_936)
    else:
        rows = attention_rows("paged attention decode", 2, 1, 63, 4, 2, 64, 16, torch.float32, False)
        rows += attention_rows("paged attention prefill", 1, 16, 0, 4, 2, 64, 16, torch.float32, False)
        rows += write_kv_rows(8, 2, 64, torch.float32) + sample_rows(2, 1000)
    print(f"\ndevice-to-device copy: {bandwidth / 1e12:.3f} TB/s ({torch.cuda.get_device_name() if CUDA else 'cpu'})\n")
    header = (f"{'kernel':<24} {'shape':<44} {'implementation':<34} {'time us':>10} {'TB/s':>7} {'% copy':>7} "
              f"{'TFLOP/s':>8}  note")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        achieved = r["bytes"] / r["seconds"]
        r["tb_per_s"], r["fraction_of_copy"] = achieved / 1e12, achieved / bandwidth
        tflops = f"{r['tflops']:8.1f}" if "tflops" in r and math.isfinite(r["tflops"]) else " " * 8
        print(f"{r['kernel']:<24} {r['shape']:<44} {r['impl']:<34} {r['seconds'] * 1e6:10.1f} "
              f"{r['tb_per_s']:7.3f} {100 * r['fraction_of_copy']:6.1f}% {tflops}  {r.get('note', '')}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"copy_tb_per_s": bandwidth / 1e12, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
