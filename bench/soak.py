"""Soak test for a running transerve server: hundreds of mixed requests, then the server must be clean.

Mixes streamed and plain requests over chat and legacy completions, random prompt and answer lengths,
and random cancellations (a stream dropped after a few chunks, a plain request abandoned on a timer).
Afterwards it checks, from the server's own /metrics, that:

- every KV block is free and no request is waiting, running or in flight;
- no request was lost: every request not cancelled got a whole answer (finish_reason, and [DONE] for a
  stream), and the server counted at least as many finished engine requests as were answered;
- resident memory did not grow past a bound between the end of the warm-up and the end of the run.

    transerve serve tiny/llama --port 8000 &
    python bench/soak.py --base-url http://127.0.0.1:8000 --model tiny/llama --requests 400

It talks only to a loopback `--base-url` and stops after the last request. Exit status 0 when every
check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import random
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlparse

import httpx
from prometheus_client.parser import text_string_to_metric_families

WORDS = "the sea light keeper storm night ship rock wave lamp tower wind salt gull tide harbor fog bell".split()


@dataclass
class Outcome:
    kind: str  # chat | chat-stream | completion | completion-stream
    status: str  # ok | cancelled | rejected | failed
    latency_s: float = 0.0
    tokens: int = 0
    detail: str = ""
    retry_after_s: float = 1.0


def check_loopback(base_url: str) -> None:
    """Refuse anything but localhost or a literal loopback address (no name is looked up)."""
    host = urlparse(base_url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        sys.exit(f"soak.py only talks to a server on this machine: give localhost, 127.x.x.x or [::1], not {host!r}")


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, frozenset], float]:
    text = (await client.get("/metrics")).text
    return {(s.name, frozenset(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def total(samples: dict, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


def delta(before: dict, after: dict, name: str, **labels: str) -> int:
    """How much a counter grew, summed over the series that carry `labels`."""
    def pick(samples: dict) -> float:
        return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)
    return int(pick(after) - pick(before))


def rss_bytes(samples: dict, pid: int | None) -> float:
    if pid is not None:
        import psutil

        return float(psutil.Process(pid).memory_info().rss)
    return total(samples, "process_resident_memory_bytes")


def make_body(rng: random.Random, model: str, kind: str) -> dict:
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 120)))
    body = {"model": model, "max_tokens": rng.randint(1, 48), "temperature": rng.choice([0.0, 0.7, 1.0]),
            "ignore_eos": rng.random() < 0.5, "stream": kind.endswith("stream")}
    if kind.startswith("chat"):
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


async def one_request(client: httpx.AsyncClient, rng: random.Random, model: str, kind: str, cancel: bool,
                      retry_for_s: float) -> Outcome:
    """One request as a well-behaved client sends it: a 429 is retried after Retry-After, for a while."""
    path = "/v1/chat/completions" if kind.startswith("chat") else "/v1/completions"
    body = make_body(rng, model, kind)
    start = time.monotonic()
    while True:
        if body["stream"]:
            outcome = await _streamed(client, path, body, kind, rng.randint(1, 6) if cancel else None)
        else:
            outcome = await _plain(client, path, body, kind, rng.uniform(0.02, 0.8) if cancel else None)
        if outcome.status != "rejected" or time.monotonic() - start > retry_for_s:
            break
        await asyncio.sleep(outcome.retry_after_s)
    outcome.latency_s = time.monotonic() - start
    return outcome


async def _plain(client, path, body, kind, cancel_after_s) -> Outcome:
    try:
        response = await asyncio.wait_for(client.post(path, json=body), cancel_after_s)
    except asyncio.TimeoutError:
        return Outcome(kind, "cancelled")  # the connection is dropped: the server must abort the request
    if response.status_code == 429:
        return Outcome(kind, "rejected", retry_after_s=float(response.headers.get("retry-after", 1)))
    if response.status_code != 200:
        return Outcome(kind, "failed", detail=f"{response.status_code} {response.text[:200]}")
    data = response.json()
    if not data["choices"][0].get("finish_reason"):
        return Outcome(kind, "failed", detail="no finish_reason")
    return Outcome(kind, "ok", tokens=data["usage"]["completion_tokens"])


async def _streamed(client, path, body, kind, cancel_after_chunks) -> Outcome:
    chunks, finished, done = 0, False, False
    async with client.stream("POST", path, json=body) as response:
        if response.status_code == 429:
            return Outcome(kind, "rejected", retry_after_s=float(response.headers.get("retry-after", 1)))
        if response.status_code != 200:
            return Outcome(kind, "failed", detail=f"{response.status_code} {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunks += 1
            finished = finished or '"finish_reason":"' in line
            if line.startswith('data: {"error"'):
                return Outcome(kind, "failed", detail=line[:200])
            if cancel_after_chunks is not None and chunks >= cancel_after_chunks:
                return Outcome(kind, "cancelled")  # leaving the block drops the connection mid-stream
    if not (finished and done):
        return Outcome(kind, "failed", detail=f"stream ended early (finish_reason {finished}, [DONE] {done})")
    return Outcome(kind, "ok", tokens=chunks)


async def run_batch(client, rng, model, kinds, n, concurrency, cancel_rate, retry_for_s) -> list[Outcome]:
    semaphore = asyncio.Semaphore(concurrency)
    plans = [(rng.choice(kinds), rng.random() < cancel_rate, random.Random(rng.random())) for _ in range(n)]

    async def limited(kind, cancel, request_rng):
        async with semaphore:
            return await one_request(client, request_rng, model, kind, cancel, retry_for_s)

    return await asyncio.gather(*[limited(*plan) for plan in plans])


async def wait_idle(client: httpx.AsyncClient, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        samples = await scrape(client)
        busy = sum(total(samples, name) for name in ("transerve_num_requests_running", "transerve_num_requests_waiting",
                                                     "transerve_num_requests_in_flight", "transerve_kv_blocks_used"))
        if busy == 0 or time.monotonic() > deadline:
            return samples
        await asyncio.sleep(0.2)


async def soak(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.concurrency * 2, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=args.request_timeout, limits=limits) as client:
        paths = (await client.get("/openapi.json")).json()["paths"]
        kinds = ["chat", "chat-stream"] + (["completion", "completion-stream"] if "/v1/completions" in paths else [])
        await run_batch(client, rng, args.model, kinds, args.warmup, args.concurrency, args.cancel_rate, args.retry_for)
        before = await wait_idle(client)
        rss_before = rss_bytes(before, args.pid)
        start = time.monotonic()
        outcomes = await run_batch(client, rng, args.model, kinds, args.requests, args.concurrency, args.cancel_rate,
                                   args.retry_for)
        elapsed = time.monotonic() - start
        after = await wait_idle(client)
        rss_after = rss_bytes(after, args.pid)

    counts = Counter(o.status for o in outcomes)
    by_kind = Counter((o.kind, o.status) for o in outcomes)
    ok = [o for o in outcomes if o.status == "ok"]
    finished = total(after, "transerve_requests_finished_total") - total(before, "transerve_requests_finished_total")
    growth_mb = (rss_after - rss_before) / 2**20
    checks = {
        "every KV block free": total(after, "transerve_kv_blocks_used") == 0,
        "nothing waiting, running or in flight": sum(total(after, n) for n in (
            "transerve_num_requests_waiting", "transerve_num_requests_running", "transerve_num_requests_in_flight")) == 0,
        "no request lost (none failed)": counts["failed"] == 0,
        "server finished >= requests answered": finished >= len(ok),
        f"RSS growth <= {args.max_rss_growth_mb} MiB": growth_mb <= args.max_rss_growth_mb,
    }
    rows = [("requests", len(outcomes)), ("elapsed s", f"{elapsed:.1f}"), ("requests/s", f"{len(outcomes) / elapsed:.2f}")]
    rows += [(f"  {kind} {status}", n) for (kind, status), n in sorted(by_kind.items())]
    rows += [(status, counts[status]) for status in ("ok", "cancelled", "rejected", "failed")]
    if ok:
        latencies = sorted(o.latency_s for o in ok)
        rows += [("latency p50 s (ok)", f"{statistics.median(latencies):.2f}"),
                 ("latency p95 s (ok)", f"{latencies[int(0.95 * (len(latencies) - 1))]:.2f}")]
    rows += [("server: engine requests finished", int(finished)),
             ("server: aborted (client left)", delta(before, after, "transerve_requests_finished_total", reason="abort")),
             ("server: 429s", delta(before, after, "transerve_requests_rejected_total")),
             ("server: preemptions", delta(before, after, "transerve_num_preemptions_total")),
             ("server: failed steps", delta(before, after, "transerve_step_failures_total")),
             ("KV blocks used / free after", f"{int(total(after, 'transerve_kv_blocks_used'))} / {int(total(after, 'transerve_kv_blocks_free'))}"),
             ("RSS MiB after warm-up -> end", f"{rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} ({growth_mb:+.1f})")]
    rows += [(f"check: {name}", "PASS" if passed else "FAIL") for name, passed in checks.items()]
    width = max(len(str(k)) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for o in outcomes:
        if o.status == "failed":
            print(f"failed {o.kind}: {o.detail}", file=sys.stderr)
    return 0 if all(checks.values()) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server, on this machine")
    parser.add_argument("--model", required=True)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=40, help="requests before memory is first measured")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--cancel-rate", type=float, default=0.2, help="fraction of requests the client abandons")
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--retry-for", type=float, default=120.0, help="seconds a request retries 429s (Retry-After)")
    parser.add_argument("--max-rss-growth-mb", type=float, default=64.0)
    parser.add_argument("--pid", type=int, default=None, help="read RSS with psutil (default: /metrics process metrics)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    check_loopback(args.base_url)
    return asyncio.run(soak(args))


if __name__ == "__main__":
    sys.exit(main())
