"""The serving stack's own ceiling: server CPU microseconds per streamed token, model cost ~0.

Builds a model directory around bench/zero_cost_model.py, starts `transerve serve DIR --trust-remote-code
--max-num-seqs 256` as a subprocess, warms it up, then lets `--clients` streaming chat clients (httpx,
one process) each stream `--max-tokens` tokens at once, and reads the server's CPU time (user + system,
all threads, from /proc/PID/stat) before and after. Run through `bench/host_overhead.py serve`.

With `--py-spy FILE` (and `--runs 1`), `py-spy record` attaches to the server for the measured load
(collapsed stacks written to FILE) and the top functions by own and by total samples are printed; the
CPU figures of such a run include py-spy's pauses of the server.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

import zero_cost_model

TARGET_US = 40.0
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK  # utime, stime: fields 14 and 15 of the line


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, args, log) -> tuple[subprocess.Popen, str]:
    """The server process, once /health answers."""
    port = free_port()
    command = [sys.executable, "-m", "transerve.cli.main", "serve", str(model_dir), "--trust-remote-code",
               "--device", "cpu", "--dtype", "float32", "--max-num-seqs", str(args.clients),
               "--max-queued-requests", str(2 * args.clients), "--host", "127.0.0.1", "--port", str(port)]
    # One intra-op thread: idle OpenMP threads that spin would be counted as server CPU.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.server_threads), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    else:
        raise TimeoutError(f"server did not start; see {log.name}")
    return proc, url


async def one_client(client: httpx.AsyncClient, url: str, max_tokens: int, index: int) -> tuple[int, int]:
    """Streams one chat completion; (completion tokens by usage, content chunks received)."""
    body = {"model": "zero-cost", "messages": [{"role": "user", "content": f"Tell me a long story, number {index}."}],
            "max_tokens": max_tokens, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    tokens = chunks = 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                chunks += 1
    return tokens, chunks


async def load(url: str, clients: int, max_tokens: int) -> tuple[int, int]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=600) as client:
        results = await asyncio.gather(*(one_client(client, url, max_tokens, i) for i in range(clients)))
    return sum(r[0] for r in results), sum(r[1] for r in results)


def run_once(url: str, pid: int, args) -> dict[str, float]:
    spy = None
    if args.py_spy:  # attached for the measured load only (not start-up or warm-up)
        spy = subprocess.Popen([args.py_spy_bin, "record", "--gil", "-r", "200", "-f", "raw",
                                "-o", args.py_spy, "--pid", str(pid)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)
    cpu, wall = cpu_seconds(pid), time.perf_counter()
    tokens, chunks = asyncio.run(load(url, args.clients, args.max_tokens))
    cpu, wall = cpu_seconds(pid) - cpu, time.perf_counter() - wall
    if spy is not None:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        spy.wait(60)
    return {"tokens": tokens, "chunks": chunks, "cpu_s": cpu, "wall_s": wall, "us_per_token": cpu / tokens * 1e6}


def top_functions(path: str, count: int = 25) -> None:
    """Own and total samples per function from py-spy's collapsed stacks."""
    own, total, samples = collections.Counter(), collections.Counter(), 0
    for line in Path(path).read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        frames = [f.split(" (")[0] + " (" + f.rsplit("/", 1)[-1] if "/" in f else f for f in stack.split(";")]
        n = int(n)
        samples += n
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    print(f"\npy-spy --gil: {samples} samples of the server thread holding the GIL; top by own samples:")
    for frame, n in own.most_common(count):
        print(f"  {100 * n / samples:5.1f}%  {frame}")
    print("top by total samples (the frame or anything it called):")
    for frame, n in total.most_common(count):
        print(f"  {100 * n / samples:5.1f}%  {frame}")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="host_overhead.py serve")
    parser.add_argument("--clients", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--server-threads", type=int, default=1, help="the server's OMP_NUM_THREADS")
    parser.add_argument("--py-spy", metavar="FILE", help="record the server with py-spy into FILE (collapsed stacks)")
    parser.add_argument("--py-spy-bin", default="py-spy")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="host-overhead-"))
    model_dir = zero_cost_model.build_model_dir(work / "zero-cost", args.vocab)
    with open(work / "server.log", "w+") as log:
        proc, url = start_server(model_dir, args, log)
        try:
            asyncio.run(load(url, min(args.clients, 16), 8))  # warm-up: first-request paths, allocator
            rows = [run_once(url, proc.pid, args) for _ in range(args.runs)]
        finally:
            proc.terminate()
            proc.wait(60)
    print(f"\n{args.clients} streaming chat clients x {args.max_tokens} tokens, zero-cost model, server OMP_NUM_THREADS="
          f"{args.server_threads}")
    # chunks: content chunks the clients read; tokens/chunk above 1 means a lagging handler got merged deltas.
    print(f"{'run':>4} {'tokens':>8} {'chunks':>8} {'tok/chunk':>10} {'wall s':>8} {'tok/s':>9} {'chunks/s':>9} "
          f"{'server CPU s':>13} {'CPU us/token':>13}")
    for i, r in enumerate(rows):
        print(f"{i + 1:>4} {r['tokens']:>8} {r['chunks']:>8} {r['tokens'] / max(r['chunks'], 1):>10.2f} {r['wall_s']:>8.2f} "
              f"{r['tokens'] / r['wall_s']:>9.0f} {r['chunks'] / r['wall_s']:>9.0f} {r['cpu_s']:>13.2f} {r['us_per_token']:>13.1f}")
    median = statistics.median(r["us_per_token"] for r in rows)
    print(f"median server CPU per streamed token: {median:.1f} us (target <= {TARGET_US:.0f} us: "
          f"{'met' if median <= TARGET_US else 'NOT met'})")
    if args.py_spy:
        top_functions(args.py_spy)
