"""`transerve serve MODEL --tensor-parallel-size 2 --device cpu` as a user runs it: the openai SDK gets one
rank's greedy answer, streamed and not; a worker killed mid-request fails that request with an error, and
the server exits non-zero within seconds, leaving no process behind. One server for the module: the
last test kills its worker."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import openai
import pytest

from conftest import LiveServer
from test_engine import EOS, greedy
from transerve.actors.assembly import load
from transerve.config import CacheConfig, EngineConfig
from transerve.engine.core import generate
from transerve.engine.request import Request

PROMPT = "The sea is"


@pytest.fixture(scope="module")
def server(tiny_repos):
    live = LiveServer("tiny/llama", "--device", "cpu", "--tensor-parallel-size", "2", "--num-kv-blocks", "64",
                      "--max-num-seqs", "8", "--no-playground")
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0, timeout=60)


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (the workers hang below a fork server), from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def test_the_sdk_gets_one_ranks_greedy_answer_streamed_and_not(server, client, tokenizer):
    ids = tokenizer(PROMPT)["input_ids"]
    single = load("tiny/llama", EngineConfig(device="cpu", cache=CacheConfig(num_kv_blocks=64)), allow_download=False)
    expected = generate(single.core, single.runner, [Request("r", ids, greedy(12), seed=0, eos_token_ids=EOS)])["r"]

    reply = client.completions.create(model="tiny/llama", prompt=PROMPT, max_tokens=12, temperature=0)
    assert reply.choices[0].text == tokenizer.decode(expected)
    assert reply.usage.completion_tokens == len(expected)
    chat = client.chat.completions.create(model="tiny/llama", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=8, temperature=0)
    stream = client.chat.completions.create(model="tiny/llama", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=8, temperature=0, stream=True)
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == chat.choices[0].message.content and chat.usage.completion_tokens > 0
    # Constrained decoding: rank 0 alone applies the token bitmask, which the workers never receive.
    constrained = client.chat.completions.create(model="tiny/llama", messages=[{"role": "user", "content": "JSON"}],
                                                 max_tokens=8, temperature=0, response_format={"type": "json_object"})
    assert constrained.choices[0].message.content.lstrip().startswith("{")
    assert "tensor parallel: 2 ranks on cpu, cpu" in server.output()


def test_a_killed_worker_fails_the_request_and_stops_the_server_without_orphans(server, client):
    processes = descendants(server.proc.pid)
    worker = int(re.search(r"rank 1 \(pid (\d+)\) ready", server.output()).group(1))
    assert worker in processes
    stream = client.chat.completions.create(model="tiny/llama", messages=[{"role": "user", "content": "Go on"}],
                                            max_tokens=900, temperature=0, stream=True, extra_body={"ignore_eos": True})
    killed = threading.Event()
    with pytest.raises(openai.APIError, match="rank 1"):
        for _ in stream:
            if not killed.is_set():
                os.kill(worker, signal.SIGKILL)
                killed.set()
    started = time.monotonic()
    returncode = server.proc.wait(30)
    assert returncode != 0 and time.monotonic() - started < 30
    assert "tensor-parallel rank 1" in server.output() and "was killed by SIGKILL" in server.output()
    deadline = time.monotonic() + 15  # the fork server exits once it sees its parent gone
    while (left := [pid for pid in processes if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

