"""Compile every Triton kernel for an H100 (sm_90) without a GPU, and show what the compiler made of it.

    PYTHONPATH=. python bench/compile_check.py [--arch 90]

AST -> TTIR -> TTGIR -> LLVM -> PTX -> cubin with the ptxas bundled in the triton wheel, for the launch
variants the engine uses, with the JIT's specialisations (unit strides as constants, 16-divisible
pointers and sizes). Prints registers, shared memory, whether the K/V loads became cp.async pipelines
and vectorised loads: a kernel that compiles here but shows scalar `ld.global.b16` loads is slow on
the card. CI runs it (tests/test_kernel_compile.py) since the interpreter can't catch compile errors.
Must run without TRITON_INTERPRET: it needs the compiled (not interpreted) kernels.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_check needs the compiled kernels: run it without TRITON_INTERPRET=1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from transerve.kernels import kv_cache, paged_attention, sampling  # noqa: E402

PA_TYPES = {"query_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "block_tables_ptr": "*i32",
            "seq_lens_ptr": "*i32", "query_start_loc_ptr": "*i32", "out_ptr": "*bf16", "part_out_ptr": "*fp32",
            "part_ml_ptr": "*fp32", "scale_log2": "fp32"}
SAMPLE_TYPES = {"logits_ptr": "*fp32", "scratch_ptr": "*fp32", "counts_ptr": "*i32", "temperature_ptr": "*fp32",
                "top_k_ptr": "*i32", "top_p_ptr": "*fp32", "min_p_ptr": "*fp32", "seeds_ptr": "*i64", "steps_ptr": "*i64",
                "repetition_ptr": "*fp32", "presence_ptr": "*fp32", "frequency_ptr": "*fp32", "out_ptr": "*i64",
                "logprob_ptr": "*fp32", "lse_ptr": "*fp32"}
KV_TYPES = {"key_ptr": "*bf16", "value_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16", "slot_mapping_ptr": "*i64"}


def variants():
    """(kernel, types, constexprs incl. unit strides, names divisible by 16, launch options)."""
    pa = paged_attention._paged_attention_kernel
    pa_div = [n for n in pa.arg_names if n.endswith("_ptr")] + [
        "head_dim", "stride_qt", "stride_qh", "stride_cb", "stride_cs", "stride_ch", "stride_ot", "stride_oh"]
    units = dict(stride_qd=1, stride_cd=1, stride_od=1)
    decode = dict(GROUP=7, BLOCK_Q=1, BLOCK_M=16, TILE=64, BLOCK_SIZE=16, HEAD_DIM_P2=64, NUM_SPLITS=1, DECODE_ONLY=True,
                  USE_WINDOW=False, DOT_FP32=False, **units)
    mixed = dict(decode, BLOCK_Q=9, BLOCK_M=64, DECODE_ONLY=False)
    for name, c in (("decode", decode), ("decode split 8", dict(decode, NUM_SPLITS=8)), ("mixed", mixed),
                    ("mixed d128 gqa4 window", dict(mixed, GROUP=4, BLOCK_Q=16, HEAD_DIM_P2=128, USE_WINDOW=True)),
                    ("decode d80 bs32", dict(decode, HEAD_DIM_P2=128, BLOCK_SIZE=32))):
        yield f"paged_attention {name}", pa, PA_TYPES, c, pa_div, dict(num_warps=4, num_stages=3)
    merge = paged_attention._merge_splits_kernel
    yield ("merge_splits", merge, {"part_out_ptr": "*fp32", "part_ml_ptr": "*fp32", "out_ptr": "*bf16"},
           dict(NUM_SPLITS=8, HEAD_DIM_P2=64, stride_od=1), ["part_out_ptr", "part_ml_ptr", "out_ptr", "head_dim"],
           dict(num_warps=1))
    kv = kv_cache._write_kv_kernel
    yield ("write_kv", kv, KV_TYPES, dict(BLOCK_SIZE=16, HEADS_P2=2, HEAD_DIM_P2=64, stride_kd=1, stride_vd=1, stride_cd=1),
           [n for n in kv.arg_names if n.endswith("_ptr")] + ["stride_kt", "stride_kh", "stride_vt", "stride_vh",
                                                              "stride_cb", "stride_cs", "stride_ch", "head_dim"],
           dict(num_warps=1))
    s = sampling._sample_kernel
    for penalties in (False, True):
        yield (f"sample penalties={penalties}", s, SAMPLE_TYPES,
               dict(BLOCK_V=2048, HAS_PENALTIES=penalties, LOGPROBS=penalties, PROMPT_FLAG=sampling._PROMPT_FLAG),
               [n for n in s.arg_names if n.endswith("_ptr")] + ["vocab", "stride_l"],
               dict(num_warps=8, enable_fp_fusion=False))


def compile_one(fn, types, constexprs, div16, options, arch):
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in fn.arg_names}
    src = ASTSource(fn, signature, {(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                    {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def describe(kernel) -> str:
    ptx = kernel.asm["ptx"]
    regs = ""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if cuobjdump.exists():
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"])
            f.flush()
            out = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
        regs = " ".join(m.group(0) for m in re.finditer(r"(REG|STACK):\d+", out))
    loads = collections.Counter(re.findall(r"ld\.global(?:\.[a-z]+)*?\.(v\d\.)?[bfsu]\d+", ptx))
    vector = sum(n for k, n in loads.items() if k)
    return (f"{regs} smem {kernel.metadata.shared} B, cp.async {ptx.count('cp.async.c')}, "
            f"mma {ptx.count('mma.sync')} wgmma {ptx.count('wgmma.mma_async')}, global loads {sum(loads.values())} "
            f"({vector} vector)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    failures = 0
    for name, fn, types, constexprs, div16, options in variants():
        try:
            print(f"{name:<36} {describe(compile_one(fn, types, constexprs, div16, options, args.arch))}", flush=True)
        except Exception as exc:  # report every kernel, then fail
            failures += 1
            print(f"{name:<36} FAILED: {type(exc).__name__}: {str(exc)[:2000]}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
