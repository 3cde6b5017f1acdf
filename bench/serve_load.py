"""Load generator for any OpenAI-compatible server, in the spirit of `vllm bench serve`.

Sends streaming requests (`stream_options.include_usage`) at one or more fixed concurrencies and prints
one row per pass: requests ok/failed, duration, request and output-token throughput, and mean/median/p99
of TTFT (time to first content token), TPOT ((e2e - ttft) / (output tokens - 1)) and ITL (gaps between
content chunks, pooled over all requests).

    python bench/serve_load.py --label transerve --concurrency 1 8 32 --num-requests 8 32 64
    python bench/serve_load.py --base-url http://localhost:8001/v1 --label "transformers serve" \\
        --endpoint completions --random-prompt-len 256 --max-tokens 64 --ignore-eos \\
        --warmup 2 --json-out /tmp/tf.json

`--num-requests` takes one value for every pass or one value per `--concurrency` value (default: four
times the concurrency, at least 8). It talks only to `--base-url` and stops after the last pass.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx

DEFAULT_PROMPT = "Write a long story about a lighthouse keeper."
WORDS = ("the sea light keeper storm night ship rock wave lamp tower wind salt gull tide harbor rope "
         "fog bell boat island shore cliff moon star old young letter journey silence morning").split()


@dataclass
class RequestResult:
    ok: bool = False
    ttft: float = 0.0  # seconds
    e2e: float = 0.0  # seconds
    output_tokens: int = 0
    itls: list[float] = field(default_factory=list)  # seconds
    error: str = ""


def random_prompt(n_words: int, seed: int) -> str:
    """About `n_words` words of filler text, different per seed, ending in an instruction."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(max(n_words - 6, 1))) + ". Continue this story at length."


def build_body(endpoint: str, model: str, prompt: str, max_tokens: int, ignore_eos: bool,
               extra: dict | None = None) -> dict:
    body: dict = {"model": model, "max_tokens": max_tokens, "stream": True, "temperature": 0.0,
                  "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if ignore_eos:
        body["ignore_eos"] = True
    body.update(extra or {})
    return body


def chunk_text(endpoint: str, chunk: dict) -> str:
    """The generated text carried by one streamed chunk ('' for role-only / usage-only chunks)."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if endpoint == "chat":
        delta = choices[0].get("delta") or {}
        return (delta.get("content") or "") + (delta.get("reasoning_content") or "")
    return choices[0].get("text") or ""


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method); 0.0 for an empty list."""
    if not values:
        return 0.0
    s = sorted(values)
    k = (len(s) - 1) * q / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def stats_ms(values: list[float]) -> dict:
    ms = [v * 1000.0 for v in values]
    return {"mean": statistics.fmean(ms) if ms else 0.0, "median": percentile(ms, 50), "p99": percentile(ms, 99)}


def summarize(label: str, concurrency: int, results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "label": label, "concurrency": concurrency, "ok": len(ok), "failed": len(results) - len(ok),
        "duration_s": duration, "req_per_s": len(ok) / duration if duration > 0 else 0.0,
        "output_tok_per_s": out_tokens / duration if duration > 0 else 0.0, "output_tokens": out_tokens,
        "ttft_ms": stats_ms([r.ttft for r in ok]), "tpot_ms": stats_ms(tpots),
        "itl_ms": stats_ms([x for r in ok for x in r.itls]), "e2e_ms": stats_ms([r.e2e for r in ok]),
    }


COLUMNS = [("label", "{}"), ("conc", "{}"), ("ok/fail", "{}"), ("dur s", "{:.2f}"), ("req/s", "{:.2f}"),
           ("out tok/s", "{:.1f}")] + [(f"{m} {s}", "{:.1f}") for m in ("TTFT", "TPOT", "ITL")
                                        for s in ("mean", "med", "p99")]


def table_row(row: dict) -> list[str]:
    vals = [row["label"], row["concurrency"], f"{row['ok']}/{row['failed']}", row["duration_s"], row["req_per_s"],
            row["output_tok_per_s"]]
    for key in ("ttft_ms", "tpot_ms", "itl_ms"):
        vals += [row[key]["mean"], row[key]["median"], row[key]["p99"]]
    return [fmt.format(v) for (_, fmt), v in zip(COLUMNS, vals)]


def format_table(rows: list[dict]) -> str:
    cells = [[name for name, _ in COLUMNS]] + [table_row(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
             for line in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines) + "\n(latencies in ms; ITL pooled over all inter-chunk gaps)"


async def one_request(client: httpx.AsyncClient, url: str, body: dict, endpoint: str) -> RequestResult:
    res = RequestResult()
    start = time.perf_counter()
    last = None
    chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("error"):
                    res.error = f"stream error: {str(chunk['error'])[:300]}"
                    return res
                if chunk.get("usage") and chunk["usage"].get("completion_tokens") is not None:
                    usage_tokens = chunk["usage"]["completion_tokens"]
                if chunk_text(endpoint, chunk):
                    now = time.perf_counter()
                    if last is None:
                        res.ttft = now - start
                    else:
                        res.itls.append(now - last)
                    last = now
                    chunks += 1
        res.e2e = time.perf_counter() - start
        res.output_tokens = usage_tokens if usage_tokens is not None else chunks
        res.ok = chunks > 0
        if not res.ok:
            res.error = "no content in stream"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res


async def run_pass(client, url, bodies: list[dict], endpoint: str, concurrency: int):
    sem = asyncio.Semaphore(concurrency)

    async def limited(body):
        async with sem:
            return await one_request(client, url, body, endpoint)

    start = time.perf_counter()
    results = await asyncio.gather(*(limited(b) for b in bodies))
    return list(results), time.perf_counter() - start


async def first_model(client: httpx.AsyncClient, base_url: str) -> str:
    resp = await client.get(f"{base_url}/models")
    resp.raise_for_status()
    data = resp.json().get("data") or []
    if not data:
        raise SystemExit(f"{base_url}/models lists no models; pass --model")
    return data[0]["id"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://localhost:8000/v1")
    p.add_argument("--model", help="default: first id from GET {base-url}/models")
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1])
    p.add_argument("--num-requests", type=int, nargs="+", help="one value, or one per concurrency")
    p.add_argument("--max-tokens", type=int, default=128)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", default=DEFAULT_PROMPT)
    g.add_argument("--random-prompt-len", type=int, metavar="N", help="random prompts of about N words")
    p.add_argument("--ignore-eos", action="store_true", help="send ignore_eos: true (vLLM / transerve)")
    p.add_argument("--extra-body", type=json.loads, default={}, metavar="JSON",
                   help="JSON object merged into every request body")
    p.add_argument("--json-schema", default=None, metavar="FILE",
                   help="also run every pass constrained to this JSON schema (response_format on chat, "
                        "structured_outputs on completions), right after the free pass, and print the ratio")
    p.add_argument("--api-key", default=None)
    p.add_argument("--label", default=None, help="server name for the table (default: host:port)")
    p.add_argument("--warmup", type=int, default=0, help="requests sent (concurrently) before measuring")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    n = args.num_requests or [max(8, 4 * c) for c in args.concurrency]
    if len(n) == 1:
        n = n * len(args.concurrency)
    if len(n) != len(args.concurrency):
        p.error("--num-requests takes one value or as many values as --concurrency")
    args.num_requests = n
    args.base_url = args.base_url.rstrip("/")
    return args


async def main_async(args: argparse.Namespace, rows: list[dict]) -> None:
    """Run the warmup and every pass, appending one summary row per finished pass to `rows`."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(args.concurrency) + 4, max_keepalive_connections=max(args.concurrency))
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(args.timeout, connect=30.0),
                                 limits=limits) as client:
        model = args.model or await first_model(client, args.base_url)
        label = args.label or httpx.URL(args.base_url).netloc.decode()
        url = f"{args.base_url}/{'chat/completions' if args.endpoint == 'chat' else 'completions'}"

        def bodies(count: int, seed: int) -> list[dict]:
            prompts = [random_prompt(args.random_prompt_len, seed + i) if args.random_prompt_len else args.prompt
                       for i in range(count)]
            return [build_body(args.endpoint, model, pr, args.max_tokens, args.ignore_eos, args.extra_body)
                    for pr in prompts]

        print(f"# {label}: model={model} endpoint={url} max_tokens={args.max_tokens}", file=sys.stderr)
        if args.warmup:
            res, _ = await run_pass(client, url, bodies(args.warmup, 10**6), args.endpoint, args.warmup)
            print(f"# warmup: {sum(r.ok for r in res)}/{len(res)} ok", file=sys.stderr)
        constraint = {}
        if args.json_schema:
            with open(args.json_schema) as f:
                schema = json.load(f)
            constraint = ({"response_format": {"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}}}
                          if args.endpoint == "chat" else {"structured_outputs": {"json": schema}})
        for i, (conc, count) in enumerate(zip(args.concurrency, args.num_requests)):
            free = None
            for kind, extra in [("", {}), *([(" +json-schema", constraint)] if constraint else [])]:
                batch = [{**body, **extra} for body in bodies(count, 1000 * i)]
                results, duration = await run_pass(client, url, batch, args.endpoint, conc)
                for err in sorted({r.error for r in results if not r.ok})[:3]:
                    print(f"# concurrency {conc}: failed: {err}", file=sys.stderr)
                row = summarize(label + kind, conc, results, duration)
                row.update(model=model, endpoint=args.endpoint, max_tokens=args.max_tokens, num_requests=count,
                           requests=[asdict(r) for r in results])
                rows.append(row)
                print(f"# done concurrency {conc}{kind}: {row['ok']}/{count} ok in {duration:.1f}s\n"
                      + format_table([row]).splitlines()[2], file=sys.stderr)
                if free is None:
                    free = row
                else:
                    ratio = row["output_tok_per_s"] / free["output_tok_per_s"] if free["output_tok_per_s"] else 0.0
                    print(f"# concurrency {conc}: constrained output throughput is {100 * ratio:.0f}% of free",
                          file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    rows: list[dict] = []
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `timeout` still gets the finished passes
    try:
        asyncio.run(main_async(args, rows))
    except KeyboardInterrupt:
        print(f"# interrupted: {len(rows)} of {len(args.concurrency)} passes finished", file=sys.stderr)
    print(format_table(rows))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2)
    return 0 if len(rows) == len(args.concurrency) and all(r["failed"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
