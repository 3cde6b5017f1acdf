#!/usr/bin/env bash
# Same-run serving comparison of two revisions of transerve: BASE (a git revision, default HEAD~1) and
# the working tree, each serving the same model, alternated ROUNDS times (default 3) so that machine
# noise hits both alike. Prints every pass's table and the median output tok/s per concurrency.
#
#   bench/compare_revisions.sh f4b464e                 # bundled SmolLM2 GGUF, concurrency 32
#   ROUNDS=5 LOAD_ARGS="--concurrency 1 32 --num-requests 6 64" bench/compare_revisions.sh main~3
#
# Every request runs to --max-tokens (--ignore-eos) at a fixed temperature, so both revisions do the same
# work whatever their sampling defaults. Bounded: every step runs under `timeout`.
set -uo pipefail
cd "$(dirname "$0")/.."
BASE=${1:-HEAD~1}
MODEL=${MODEL:-SmolLM2-135M-Instruct}
ROUNDS=${ROUNDS:-3}
LOAD_ARGS=${LOAD_ARGS:---concurrency 32 --num-requests 64}
SERVE_ARGS=${SERVE_ARGS:---dtype float32 --max-num-seqs 64}
OUT=${OUT:-$(mktemp -d /tmp/compare-revisions.XXXX)}
BASE_TREE="$OUT/base"
git worktree add -q --detach "$BASE_TREE" "$BASE" || exit 1
trap 'git worktree remove --force "$BASE_TREE"' EXIT

port() { python -c "import socket;s=socket.socket();s.bind(('127.0.0.1',0));print(s.getsockname()[1])"; }
wait_up() { for _ in $(seq 600); do curl -sf "http://127.0.0.1:$1/health" >/dev/null && return 0; sleep 1; done; return 1; }

run_one() {  # $1 label, $2 source tree, $3 round
    local p server
    p=$(port)
    # exec: $! is then `timeout` itself, which passes the TERM below on to the server (a subshell would not,
    # and a server left spinning would slow every later pass). The tree's own directory as cwd: `python -m`
    # puts the cwd first on sys.path, so each server imports its own revision.
    (cd "$2" && exec env PYTHONPATH="$2" HF_HUB_OFFLINE=1 timeout 1800 python -m transerve.cli.main serve "$MODEL" \
        --host 127.0.0.1 --port "$p" $SERVE_ARGS > "$OUT/$1-$3.log" 2>&1) &
    server=$!
    if wait_up "$p"; then
        timeout 1500 python bench/serve_load.py --base-url "http://127.0.0.1:$p/v1" --model "$MODEL" --label "$1" \
            --max-tokens 128 --ignore-eos --extra-body '{"temperature": 0.7}' --warmup 4 $LOAD_ARGS \
            --json-out "$OUT/$1-$3.json"
    else
        echo "# $1 did not start; see $OUT/$1-$3.log" >&2
    fi
    kill -TERM $server 2>/dev/null; wait $server 2>/dev/null
    if pgrep -f -- "--port $p " >/dev/null; then echo "# $1 server did not stop" >&2; pkill -9 -f -- "--port $p "; fi
}

for round in $(seq "$ROUNDS"); do
    run_one base "$BASE_TREE" "$round"
    run_one head "$PWD" "$round"
done

python - "$OUT" "$(git rev-parse --short "$BASE")" <<'EOF'
import glob, json, statistics, sys
out, base = sys.argv[1], sys.argv[2]
tok: dict = {}
for path in sorted(glob.glob(f"{out}/*.json")):
    label = path.rsplit("/", 1)[1].split("-")[0]
    for row in json.load(open(path))["results"]:
        tok.setdefault((label, row["concurrency"]), []).append(row["output_tok_per_s"])
print(f"\nmedian output tok/s over rounds (base = {base}, head = working tree)")
print("| concurrency | base | head | head / base | runs |\n|---|---|---|---|---|")
for conc in sorted({c for _, c in tok}):
    b, h = tok.get(("base", conc), []), tok.get(("head", conc), [])
    if b and h:
        mb, mh = statistics.median(b), statistics.median(h)
        runs = " ".join(f"{x:.1f}" for x in b) + " / " + " ".join(f"{x:.1f}" for x in h)
        print(f"| {conc} | {mb:.1f} | {mh:.1f} | {mh / mb:.2f}x | {runs} |")
EOF
