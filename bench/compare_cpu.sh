#!/usr/bin/env bash
# Servers on one CPU box in one run, on SmolLM2-135M-Instruct, one after the other: transerve (the default:
# the GGUF's quantized weights with compiled decode steps; eager; float32), llama.cpp's llama-server on the same GGUF
# (when built), and `transformers serve --continuous-batching` (when asked). 128-token answers, greedy.
# Prints every pass as it goes, then one table of all rows and the median output tok/s per server and
# concurrency over ROUNDS rounds.
#
#   bench/compare_cpu.sh                                      # all that is installed, 3 rounds
#   SERVERS="transerve-q4 llama" CONCURRENCY="1" ROUNDS=3 bench/compare_cpu.sh
#
# llama-server: /tmp/llama-build/bin/llama-server (../shared/anchors/build_llama_server.sh), run with
# `-t $THREADS -np <concurrency>` (one server per concurrency). transformers serve needs
# pip install 'transformers[serving]' and the float32 copy in /tmp/smollm2-hf (bench/README.md).
# Every step runs under `timeout`. On a box shared with other jobs, export OMP_WAIT_POLICY=PASSIVE: spinning
# OpenMP threads on oversubscribed cores made a float32 step ~10x slower here.
set -uo pipefail
cd "$(dirname "$0")/.."
GGUF=${GGUF:-$(python -c "from transerve.engine.models import bundled_gguf_path as p; print(p())")}
LLAMA_SERVER=${LLAMA_SERVER:-/tmp/llama-build/bin/llama-server}
MODEL_DIR=${MODEL_DIR:-/tmp/smollm2-hf}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-3}
CONCURRENCY=${CONCURRENCY:-1 8 32}
NUM_REQUESTS=${NUM_REQUESTS:-}          # one per concurrency; default 4x each concurrency, at least 6
[ -z "$NUM_REQUESTS" ] && for c in $CONCURRENCY; do NUM_REQUESTS="$NUM_REQUESTS $(( c * 4 > 6 ? c * 4 : 6 ))"; done
LOAD_ARGS="--max-tokens 128 --warmup 2 --timeout 900 --extra-body {\"temperature\":0}"
DEFAULT_SERVERS="transerve-f32 transerve-q4-eager transerve-q4"
[ -x "$LLAMA_SERVER" ] && DEFAULT_SERVERS="$DEFAULT_SERVERS llama"
SERVERS=${SERVERS:-$DEFAULT_SERVERS}
OUT=${OUT:-/tmp/compare-cpu}; mkdir -p "$OUT"; rm -f "$OUT"/*.txt

p=""; pid=""
port() { python -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])"; }
wait_up() { for _ in $(seq 900); do curl -sf "http://127.0.0.1:$1/v1/models" >/dev/null && return 0; sleep 1; done; return 1; }
stop() { kill -TERM "$1" 2>/dev/null; wait "$1" 2>/dev/null; }

# $1 label, $2 port, $3 concurrencies, $4 request counts, $5 extra serve_load args
load() {
    wait_up "$2" || { echo "# $1: server did not come up (see $OUT/$1.log)"; return; }
    timeout 2400 python bench/serve_load.py --base-url "http://127.0.0.1:$2/v1" --label "$1" --concurrency $3 \
        --num-requests $4 $LOAD_ARGS $5 | tee -a "$OUT/rows-$1.txt"
}

transerve() {  # $1 label, rest: serve flags
    local label=$1; shift; local p; p=$(port)
    OMP_NUM_THREADS=$THREADS HF_HUB_OFFLINE=1 timeout 3600 python -m transerve.cli.main serve "$GGUF" --host 127.0.0.1 \
        --port "$p" --max-num-seqs 64 "$@" > "$OUT/$label.log.now" 2>&1 &
    local pid=$!
    # Compiled decode steps get ready in the background (minutes the first time): measure them once ready.
    if [[ " $* " != *" --enforce-eager "* ]]; then
        for _ in $(seq 3600); do grep -qE "run compiled|compiling the decode steps failed" "$OUT/$label.log.now" && break; sleep 1; done
    fi
    load "$label" "$p" "$CONCURRENCY" "$NUM_REQUESTS" --ignore-eos
    cat "$OUT/$label.log.now" >> "$OUT/$label.log"
    stop $pid
}

for round in $(seq "$ROUNDS"); do
    echo "# round $round of $ROUNDS: $SERVERS (concurrency $CONCURRENCY, $THREADS threads; load $(cut -d' ' -f1-3 /proc/loadavg))"
    for server in $SERVERS; do
        case $server in
            transerve-q4) transerve "$server" --quantization gguf ;;
            transerve-q4-eager) transerve "$server" --quantization gguf --enforce-eager ;;
            transerve-f32) transerve "$server" --quantization none --enforce-eager ;;
            transerve-f32-compile) transerve "$server" --quantization none ;;
            transerve-f32-sync) transerve "$server" --quantization none --enforce-eager --no-async-scheduling ;;
            llama)
                set -- $NUM_REQUESTS
                for c in $CONCURRENCY; do
                    p=$(port)
                    timeout 3600 "$LLAMA_SERVER" -m "$GGUF" -t "$THREADS" -np "$c" -c $(( c * 2048 )) --host 127.0.0.1 \
                        --port "$p" >> "$OUT/llama.log" 2>&1 &
                    pid=$!
                    load llama-server "$p" "$c" "$1" --ignore-eos
                    stop $pid; shift
                done ;;
            transformers)
                p=$(port)
                HF_HUB_OFFLINE=1 timeout 3600 transformers serve "$MODEL_DIR" --continuous-batching --dtype float32 \
                    --device cpu --host 127.0.0.1 --port "$p" >> "$OUT/transformers.log" 2>&1 &
                pid=$!
                load "transformers-serve" "$p" "$CONCURRENCY" "$NUM_REQUESTS" ""
                stop $pid ;;
        esac
    done
done

echo; echo "# all passes (label conc ok/fail dur req/s out-tok/s ...), then median output tok/s over $ROUNDS rounds"
cat "$OUT"/rows-*.txt | grep -E '^(label|transerve|llama|transformers)' | awk '!(/^label/ && seen++)'
cat "$OUT"/rows-*.txt | awk '$2 ~ /^[0-9]+$/ && $1 !~ /^label/ {k=$1" "$2; v[k]=v[k]" "$6} END {for (k in v) print k, v[k]}' |
    python -c "
import statistics, sys
rows = sorted((l.split()[0], int(l.split()[1]), [float(x) for x in l.split()[2:]]) for l in sys.stdin if l.strip())
print(f\"{'server':24} {'conc':>4} {'median out tok/s':>16}  runs\")
for label, conc, runs in rows:
    print(f'{label:24} {conc:>4} {statistics.median(runs):>16.1f}  ' + ' '.join(f'{r:.1f}' for r in runs))
"
