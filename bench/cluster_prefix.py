"""Prefix-cache hit rate of a multi-turn workload against any transerve endpoint (`transerve cluster`
with --router prefix or round-robin, or one `transerve serve`).

C conversations run side by side, each T turns in sequence: every turn resends the whole conversation
so far plus a new user message, as chat clients do. The hit rate is what the users' own answers say:
the sum of `usage.prompt_tokens_details.cached_tokens` over the sum of `usage.prompt_tokens`. With
several replicas, /metrics also says how the requests spread (transerve_replica_requests_total).

    transerve cluster SmolLM2-135M-Instruct --replicas 2 --router prefix --port 8000 &
    python bench/cluster_prefix.py --label prefix --json-out /tmp/prefix.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time

import httpx
import openai

TOPICS = ("lighthouses", "bread baking", "glaciers", "chess openings", "honeybees", "tidal power", "violins",
          "desert plants", "comets", "ancient roads", "coral reefs", "paper making")


def opening(i: int, words: int) -> str:
    """A long, distinct first message: the shared prefix every later turn of conversation i resends."""
    topic = TOPICS[i % len(TOPICS)]
    body = " ".join(f"Point {k} about {topic} deserves a careful answer." for k in range(words // 7))
    return f"Conversation {i}. Let us talk about {topic}. {body} First, what is the most surprising fact?"


async def conversation(client: openai.AsyncOpenAI, model: str, i: int, turns: int, max_tokens: int,
                       words: int) -> list[tuple[int, int]]:
    messages = [{"role": "user", "content": opening(i, words)}]
    usage = []
    for t in range(turns):
        answer = await client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                      temperature=0)
        details = answer.usage.prompt_tokens_details
        usage.append((answer.usage.prompt_tokens, (details.cached_tokens or 0) if details else 0))
        messages += [{"role": "assistant", "content": answer.choices[0].message.content},
                     {"role": "user", "content": f"Turn {t + 2}: tell me more, and why."}]
    return usage


def replica_requests(base_url: str) -> dict[str, float]:
    text = httpx.get(base_url.removesuffix("/v1") + "/metrics").text
    return {r: float(v) for r, v in re.findall(r'transerve_replica_requests_total\{replica="([^"]+)"\} (\S+)', text)}


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://localhost:8000/v1")
    p.add_argument("--model", help="default: first id from GET {base-url}/models")
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--opening-words", type=int, default=200, help="about this many words in each first message")
    p.add_argument("--label", default="")
    p.add_argument("--json-out", default=None)
    args = p.parse_args()
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key="none", max_retries=0, timeout=600)
    model = args.model or (await client.models.list()).data[0].id
    before = replica_requests(args.base_url)
    start = time.perf_counter()
    runs = await asyncio.gather(*(conversation(client, model, i, args.turns, args.max_tokens, args.opening_words)
                                  for i in range(args.conversations)))
    elapsed = time.perf_counter() - start
    await asyncio.sleep(2.5)  # the ingress polls replica stats every second
    after = replica_requests(args.base_url)
    prompt = sum(n for run in runs for n, _ in run)
    cached = sum(c for run in runs for _, c in run)
    spread = {r: int(after[r] - before.get(r, 0)) for r in after}
    result = {"label": args.label, "conversations": args.conversations, "turns": args.turns,
              "prompt_tokens": prompt, "cached_tokens": cached, "hit_rate": cached / prompt if prompt else 0.0,
              "seconds": elapsed, "requests_per_replica": spread}
    print(f"{args.label or args.base_url}: prefix-cache hit rate {result['hit_rate']:.1%} "
          f"({cached}/{prompt} prompt tokens), {elapsed:.1f} s, requests per replica {sorted(spread.values())}")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({**result, "per_turn": runs}, f, indent=1)


if __name__ == "__main__":
    asyncio.run(main())
