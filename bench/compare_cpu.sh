#!/usr/bin/env bash
# transerve vs `transformers serve --continuous-batching` on SmolLM2-135M-Instruct (float32, CPU), one
# after the other in one run, 128-token answers at concurrency 1, 8 and 32. Prints both tables.
# Needs: pip install 'transformers[serving]' and the float32 copy of the GGUF in /tmp/smollm2-hf
# (bench/README.md, "Baseline: transformers serve"). Bounded: every step runs under `timeout`.
set -uo pipefail
cd "$(dirname "$0")/.."
MODEL_DIR=${MODEL_DIR:-/tmp/smollm2-hf}
LOAD_ARGS=${LOAD_ARGS:---concurrency 1 8 32 --num-requests 6 24 64 --max-tokens 128 --warmup 2 --timeout 900}
port() { python -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])"; }
wait_up() { for _ in $(seq 600); do curl -sf "http://127.0.0.1:$1/v1/models" >/dev/null && return 0; sleep 1; done; return 1; }

P=$(port)
HF_HUB_OFFLINE=1 timeout 1800 transerve serve "$MODEL_DIR" --dtype float32 --host 127.0.0.1 --port "$P" \
    --max-num-seqs 64 > /tmp/compare-transerve.log 2>&1 &
SERVER=$!
wait_up "$P" && timeout 1500 python bench/serve_load.py --base-url "http://127.0.0.1:$P/v1" --label transerve \
    $LOAD_ARGS --json-out /tmp/compare-transerve.json
kill -TERM $SERVER; wait $SERVER

P=$(port)
HF_HUB_OFFLINE=1 timeout 1800 transformers serve "$MODEL_DIR" --continuous-batching --dtype float32 --device cpu \
    --host 127.0.0.1 --port "$P" > /tmp/compare-transformers.log 2>&1 &
SERVER=$!
wait_up "$P" && timeout 1500 python bench/serve_load.py --base-url "http://127.0.0.1:$P/v1" \
    --label "transformers serve --continuous-batching" $LOAD_ARGS --json-out /tmp/compare-transformers.json
kill -TERM $SERVER; wait $SERVER
