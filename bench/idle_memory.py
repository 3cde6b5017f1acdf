"""Resident memory of a server holding the default model: idle after one short answer, and after a load
that fills a given number of KV tokens. transerve rows, and llama-server on the same GGUF when it is built.

    PYTHONPATH=. python bench/idle_memory.py                     # default rows, 32k-token capacity
    PYTHONPATH=. python bench/idle_memory.py --fill-tokens 0     # idle only

Each server gets the same token capacity: llama-server `-np 32 -c 32768`, transerve `--num-kv-blocks`
of 32768 tokens (and a row at its own default capacity). RSS is the server process's VmRSS (the sum
over its process tree).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
LLAMA_SERVER = os.environ.get("LLAMA_SERVER", "/tmp/llama-build/bin/llama-server")


def tree_rss_bytes(pid: int) -> int:
    pids, total = [pid], 0
    while pids:
        p = pids.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        total += next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
        pids.extend(map(int, children))
    return total


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("server did not become healthy")


def chat(base: str, content: str, max_tokens: int) -> None:
    body = {"model": "default", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0}
    httpx.post(f"{base}/v1/chat/completions", json=body, timeout=600).raise_for_status()


def measure(label: str, command: list[str], port: int, fill_tokens: int) -> tuple[str, int, int | None]:
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"))
    try:
        wait_healthy(base, proc)
        print(f"{label}: healthy", flush=True)
        chat(base, "Say hello.", 8)
        time.sleep(2)
        idle = tree_rss_bytes(proc.pid)
        filled = None
        if fill_tokens:
            # Distinct long prompts (no shared prefix beyond the template) until the cache holds fill_tokens;
            # ~800 tokens each, within a llama-server slot's share of the context (32768 / 32 = 1024).
            per_request = 800
            for i in range(fill_tokens // per_request):  # the words are ~6-8 tokens each
                chat(base, f"{i} " + " ".join(f"word{i}x{j}" for j in range(per_request // 8)), 4)
            time.sleep(2)
            filled = tree_rss_bytes(proc.pid)
        print(f"{label}: idle {idle / 2**20:,.0f} MiB" + (f", after the load {filled / 2**20:,.0f} MiB" if filled else ""), flush=True)
        return label, idle, filled
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--capacity", type=int, default=32768, help="KV tokens every server may hold")
    parser.add_argument("--fill-tokens", type=int, default=16384, help="prompt tokens pushed through before the second reading")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="run only the rows whose label contains this")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from transerve.engine.models import bundled_gguf_path

    gguf = str(bundled_gguf_path())
    serve = [sys.executable, "-m", "transerve.cli.main", "serve", gguf, "--host", "127.0.0.1"]
    blocks = str(args.capacity // 16)
    rows = [
        ("transerve default (the GGUF's blocks)", [*serve, "--port", "8701"], 8701),
        (f"transerve default, {args.capacity} tokens", [*serve, "--port", "8706", "--num-kv-blocks", blocks], 8706),
        (f"transerve float32, {args.capacity} tokens", [*serve, "--port", "8702", "--num-kv-blocks", blocks, "--quantization", "none"], 8702),
        (f"transerve gguf, bf16 KV, {args.capacity} tokens",
         [*serve, "--port", "8704", "--num-kv-blocks", blocks, "--quantization", "gguf", "--kv-cache-dtype", "bfloat16"], 8704),
    ]
    if Path(LLAMA_SERVER).exists():
        rows.append((f"llama-server -np 32 -c {args.capacity}", [LLAMA_SERVER, "-m", gguf, "-t", str(args.threads), "-np", "32",
                                                              "-c", str(args.capacity), "--host", "127.0.0.1", "--port", "8705"], 8705))
    rows = [row for row in rows if args.only in row[0]]
    results = [measure(label, command, port, args.fill_tokens) for label, command, port in rows]
    anchor = next((idle for label, idle, _ in results if label.startswith("llama")), None)
    print(f"\n{'server':44} {'idle RSS':>10} {'vs llama':>9} {'after ' + str(args.fill_tokens) + ' KV tokens':>22}")
    for label, idle, filled in results:
        ratio = f"{idle / anchor:.2f}x" if anchor else "-"
        after = f"{filled / 2**20:,.0f} MiB" if filled else "-"
        print(f"{label:44} {idle / 2**20:>6,.0f} MiB {ratio:>9} {after:>22}")


if __name__ == "__main__":
    main()
