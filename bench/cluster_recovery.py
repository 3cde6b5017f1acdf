"""How long a `transerve cluster` replica takes to come back after its process is killed.

Reads the replicas' pids from the ingress's /metrics (transerve_replica_info), SIGKILLs one (it must
run on that replica's machine), and times until /health counts every replica again, the killed one
replaced by a new one; meanwhile it checks that requests still get answers from the others.

    python bench/cluster_recovery.py --base-url http://localhost:8000 --rounds 2
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import time

import httpx


def replicas(base_url: str) -> dict[str, int]:
    text = httpx.get(base_url + "/metrics").text
    pattern = r'transerve_replica_info\{node="[^"]*",pid="(\d+)",replica="([^"]+)"\}'
    return {replica: int(pid) for pid, replica in re.findall(pattern, text)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://localhost:8000")
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    model = httpx.get(args.base_url + "/v1/models").json()["data"][0]["id"]
    expected = httpx.get(args.base_url + "/health").json()["replicas"]["expected"]
    for _ in range(args.rounds):
        before = replicas(args.base_url)
        victim, pid = sorted(before.items())[0]
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        answered = 0
        while True:
            body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
            answered += httpx.post(args.base_url + "/v1/chat/completions", json=body, timeout=60).status_code == 200
            now = replicas(args.base_url)
            if len(now) == expected and victim not in now:
                break
            time.sleep(0.5)
        print(f"replica {victim} (pid {pid}) killed; {expected} replicas again after "
              f"{time.monotonic() - killed:.1f} s; {answered} requests answered meanwhile")


if __name__ == "__main__":
    main()
