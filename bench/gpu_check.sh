#!/usr/bin/env bash
# One GPU check, under 10 minutes: the kernel tests at real shapes, a live server driven by the openai
# SDK and bench/serve_load.py, offline throughput for our engine (512 requests, and a single request)
# and for transformers' generate_batch, the kernel benchmark; then one summary table. The engine steps
# need torch, triton and transformers only; the server step also needs transerve's dependencies (carried
# as wheels on the GPU box) and the tokenizer that `bench/gpu_serve_check.py --save-tokenizer` saves.
# Run it from the repository root.
#
#   bash bench/gpu_check.sh            # logs in $OUT/gpu_check.tgz (or ./gpu_check_out), summary printed
#
# The step limits add up to 580 s, so a device call of 600 s still prints the summary. Do not pipe the
# script's output: a call killed at its limit kills the whole pipeline and returns none of it.
#   OFFLINE_ARGS="--tiny --num-requests 4 --output-len 8" SERVE_ARGS="--device cpu" bash bench/gpu_check.sh   # CPU dry run
# (about 6 min here: the kernel tests interpreted at small shapes, a tiny served model, a light load). The
# served model needs SmolLM2's tokenizer in .gpu_assets/tokenizer: the serve step saves it where the GGUF is
# installed; run it (or the dry run) here once before a device call so the folder travels with the checkout.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset TRITON_INTERPRET
OUT_DIR="${OUT:+/tmp/gpu_check}"
OUT_DIR="${OUT_DIR:-$PWD/gpu_check_out}"
mkdir -p "$OUT_DIR"
: > "$OUT_DIR/offline.jsonl"; : > "$OUT_DIR/steps.txt"
START=$(date +%s)

step() {  # step NAME SECONDS CMD...: run with a hard time limit, log to $OUT_DIR/NAME.log
    local name=$1 limit=$2
    shift 2
    local t0=$(date +%s)
    echo "=== $name (limit ${limit}s): $*"
    timeout -k 10 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$OUT_DIR/steps.txt"
    tail -n 25 "$OUT_DIR/$name.log"
    # $OUT brings back 8 files at most: every log travels in one archive, refreshed after each step.
    [ -n "${OUT:-}" ] && tar czf "$OUT/gpu_check.tgz" -C "$OUT_DIR" .
}

nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null | tee "$OUT_DIR/gpu.txt"
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT_DIR/gpu.txt"

# On CUDA the kernel tests run compiled at real shapes; without it (a dry run) interpreted at small shapes.
KERNEL_TESTS=$(python -c "import torch; print('gpu' if torch.cuda.is_available() else 'interpret')")
echo "$KERNEL_TESTS" > "$OUT_DIR/kernel_mode.txt"
if python -c "import pytest" 2>/dev/null; then
    TRANSERVE_KERNEL_TESTS=$KERNEL_TESTS step kernel_tests 100 python -m pytest -q -p no:cacheprovider \
        tests/test_kernels.py tests/test_kernel_sampling.py tests/test_kernel_e2e.py tests/test_kernel_cuda_graphs.py
else
    echo "kernel_tests skipped: pytest is not installed" | tee -a "$OUT_DIR/steps.txt"
fi
step serve 130 python bench/gpu_serve_check.py --out-dir "$OUT_DIR/serve" ${SERVE_ARGS:-}
step offline_transerve 80 python bench/offline_throughput.py --json-out "$OUT_DIR/offline.jsonl" ${OFFLINE_ARGS:-}
# Issue 15's target shape (>= 25,000 output tokens/s on an H100/H200). A dry run keeps its tiny OFFLINE_ARGS.
step offline_transerve_nano 70 python bench/offline_throughput.py --json-out "$OUT_DIR/offline.jsonl" ${OFFLINE_ARGS:---nano-vllm-shape}
step offline_transerve_batch1 40 python bench/offline_throughput.py --batch-1 --json-out "$OUT_DIR/offline.jsonl" ${OFFLINE_ARGS:-}
step offline_hf 90 python bench/offline_throughput.py --engine hf --json-out "$OUT_DIR/offline.jsonl" ${OFFLINE_ARGS:-}
step kernel_bench 70 python bench/kernel_bench.py --sweep --json-out "$OUT_DIR/kernels.json"

python - "$OUT_DIR" "$(( $(date +%s) - START ))" <<'EOF'
import json, re, sys
from pathlib import Path

out, total = Path(sys.argv[1]), sys.argv[2]
rows = []
tests = (out / "kernel_tests.log")
if tests.exists():
    summary = [l for l in tests.read_text().splitlines() if re.search(r"\d+ (passed|failed|error)", l)]
    mode = (out / "kernel_mode.txt").read_text().strip() if (out / "kernel_mode.txt").exists() else "gpu"
    rows.append((f"kernel tests ({'GPU shapes' if mode == 'gpu' else 'interpreted, small shapes'})", summary[-1].strip("= ") if summary else "no result (see kernel_tests.log)", ""))
kernels = out / "kernels.json"
if kernels.exists():
    data = json.loads(kernels.read_text())
    copy = data["copy_tb_per_s"]
    rows.append(("device-to-device copy", f"{copy:.3f} TB/s", "ceiling"))
    by_shape = {}
    for r in data["rows"]:
        by_shape.setdefault((r["kernel"], r["shape"]), []).append(r)
    for (kernel, shape), rs in by_shape.items():
        auto = [r for r in rs if r["impl"] in ("triton paged (auto)", "triton")]
        for label, pick in (("ours", auto), ("best sweep", [min((r for r in rs if r["impl"].startswith("triton")), key=lambda r: r["seconds"])]),
                            ("torch SDPA", [r for r in rs if "SDPA" in r["impl"]]), ("torch ref", [r for r in rs if "reference" in r["impl"]])):
            for r in pick[:1]:
                if label == "best sweep" and r in auto:
                    continue
                rows.append((f"{kernel} {shape} [{label}]",
                             f"{r['seconds'] * 1e6:9.1f} us  {r['tb_per_s']:.3f} TB/s  {100 * r['fraction_of_copy']:.0f}% of copy",
                             (r["impl"] if label == "best sweep" else "") + (" " + r.get("note", "")).rstrip()))
offline = out / "offline.jsonl"
if offline.exists():
    for line in offline.read_text().splitlines():
        r = json.loads(line)
        rows.append((f"offline {r['engine']} ({r['requests']} req)", f"{r['output_tokens_per_s']:,.1f} output tok/s",
                     f"{r['output_tokens']} tokens in {r['seconds']:.1f} s"))
load = out / "serve" / "load.json"
if load.exists():
    for r in json.loads(load.read_text())["results"]:
        rows.append((f"server, concurrency {r['concurrency']}", f"{r['output_tok_per_s']:,.1f} output tok/s",
                     f"{r['ok']} ok / {r['failed']} failed; TTFT med {r['ttft_ms']['median']:.1f} ms, TPOT med {r['tpot_ms']['median']:.2f} ms"))
for line in (out / "steps.txt").read_text().splitlines():
    if "rc=0" not in line:
        rows.append(("step problem", line, "see its .log"))
width = max(len(r[0]) for r in rows) if rows else 10
print("\n" + "=" * 100 + f"\nSUMMARY ({total} s total)\n" + "=" * 100)
lines = [f"{name:<{width}}  {value:<48} {note}" for name, value, note in rows]
print("\n".join(lines))
(out / "summary.txt").write_text("\n".join(lines) + "\n")
EOF
[ -n "${OUT:-}" ] && cp "$OUT_DIR/summary.txt" "$OUT/" && tar czf "$OUT/gpu_check.tgz" -C "$OUT_DIR" .
