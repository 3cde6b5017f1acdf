"""`transerve cluster`: two CPU replicas of tiny/llama on a local Ray instance behind one ingress, driven
by the openai SDK as a user would; checked against a single `transerve serve` and per-replica /metrics.

One cluster serves the whole module (Ray and two engines take tens of seconds to start on a small
box); the tests run in order, the replica kill and the shutdown last.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import openai
import psutil
import pytest

from conftest import _SESSION_TMP, LiveServer, free_port

MODEL = "tiny/llama"
ENGINE_FLAGS = ("--device", "cpu", "--num-kv-blocks", "256", "--max-num-seqs", "16")


class ClusterProcess:
    """`transerve cluster MODEL --replicas 2` in a subprocess, ready when /health counts every replica."""

    def __init__(self, replicas: int = 2) -> None:
        self.replicas = replicas
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = open(_SESSION_TMP / f"cluster-{self.port}.log", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "transerve.cli.main", "cluster", MODEL, "--replicas", str(replicas), *ENGINE_FLAGS,
             "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cluster exited with {self.proc.returncode}:\n{self.output()}")
            try:
                health = httpx.get(self.base_url + "/health", timeout=2)
                if health.status_code == 200 and health.json()["replicas"]["healthy"] == self.replicas:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"cluster did not start:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> list[psutil.Process]:
        """SIGTERM, as Ctrl-C would; returns the processes it had started that are still alive after."""
        if self.proc.poll() is not None:
            return []
        started = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(90)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        _, alive = psutil.wait_procs(started, timeout=30)
        for p in alive:
            p.kill()  # a leak the test reports, not one the box keeps
        return alive


@pytest.fixture(scope="module")
def cluster_and_single(tiny_repos):
    """The cluster, and one `transerve serve` of the same model to compare answers with (started while
    Ray starts, stopped after the first test)."""
    c, single = ClusterProcess(), None
    try:
        single = LiveServer(MODEL, *ENGINE_FLAGS)
        c.wait_ready()
        yield c, single
    finally:
        c.stop()
        if single is not None:
            single.stop()


@pytest.fixture(scope="module")
def cluster(cluster_and_single):
    return cluster_and_single[0]


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.base_url + "/v1", api_key="none", max_retries=0)


def replica_metrics(base_url: str) -> dict[str, dict[str, float]]:
    """Per replica: requests ended, prefix-cache hit tokens, in-flight requests, pid (from /metrics)."""
    text = httpx.get(base_url + "/metrics").text
    out: dict[str, dict[str, float]] = {}
    for name, key in (("transerve_replica_requests_total", "requests"),
                      ("transerve_replica_prefix_cache_hit_tokens_total", "cached"),
                      ("transerve_replica_requests_in_flight", "in_flight"),
                      ("transerve_replica_generation_tokens_total", "generated")):
        for replica, value in re.findall(name + r'\{replica="([^"]+)"\} (\S+)', text):
            out.setdefault(replica, {})[key] = float(value)
    for pid, replica in re.findall(r'transerve_replica_info\{node="[^"]*",pid="(\d+)",replica="([^"]+)"\}', text):
        out.setdefault(replica, {})["pid"] = int(pid)
    return out


def requests_added(base_url: str, before: dict, expected_total: int, timeout: float = 15.0) -> dict[str, int]:
    """Requests each replica ended since `before`, once they add up to `expected_total` (stats are polled)."""
    deadline = time.monotonic() + timeout
    while True:
        after = replica_metrics(base_url)
        added = {r: int(m.get("requests", 0) - before.get(r, {}).get("requests", 0)) for r, m in after.items()}
        if sum(added.values()) >= expected_total or time.monotonic() > deadline:
            return added
        time.sleep(0.3)


def chat(client, content: str, stream: bool = False, **kwargs):
    messages = kwargs.pop("messages", None) or [{"role": "user", "content": content}]
    return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=kwargs.pop("max_tokens", 12),
                                          temperature=0, stream=stream, **kwargs)


def test_answers_through_the_ingress_equal_a_single_servers(cluster_and_single, client):
    cluster, single = cluster_and_single
    try:
        reference = openai.OpenAI(base_url=single.base_url + "/v1", api_key="none", max_retries=0)
        for prompt in ("What is the capital of France?", "Count to five."):
            expected = chat(reference, prompt).choices[0].message.content
            answer = chat(client, prompt)
            assert answer.choices[0].message.content == expected
            assert answer.usage.completion_tokens == 12 and answer.model == MODEL
            streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, prompt, stream=True) if c.choices)
            assert streamed == expected
        expected = reference.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0)
        answer = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0)
        assert answer.choices[0].text == expected.choices[0].text
    finally:
        single.stop()


def test_models_and_health_count_the_replicas(cluster, client):
    health = httpx.get(cluster.base_url + "/health").json()
    assert health == {"status": "ok", "replicas": {"healthy": 2, "expected": 2}}
    listed = [m for m in client.models.list().data if m.id == MODEL]
    assert listed and listed[0].model_extra["replicas"] == {"healthy": 2, "expected": 2}
    assert len(replica_metrics(cluster.base_url)) == 2


def test_unrelated_prompts_spread_over_both_replicas(cluster, client):
    before = replica_metrics(cluster.base_url)
    for i in range(8):
        chat(client, f"Unrelated question number {i}: " + f"{i} " * 60, max_tokens=2)
    added = requests_added(cluster.base_url, before, 8)
    assert sum(added.values()) == 8
    assert all(n >= 2 for n in added.values()), added


def test_prompts_sharing_a_long_prefix_go_to_one_replica_and_hit_its_cache(cluster, client):
    system = "You are a careful assistant. " + " ".join(f"Rule {i}: answer rule {i} briefly." for i in range(60))
    before = replica_metrics(cluster.base_url)
    for i in range(4):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}?"}]
        chat(client, "", messages=messages, max_tokens=2)
    added = requests_added(cluster.base_url, before, 4)
    assert sorted(added.values()) == [0, 4], added
    (replica,) = [r for r, n in added.items() if n == 4]
    after = replica_metrics(cluster.base_url)
    # The first request computed the prefix; the other three found its blocks in that replica's cache.
    assert after[replica]["cached"] - before[replica]["cached"] >= 3 * len(system) // 8


def test_a_client_that_leaves_aborts_its_request_on_the_replica(cluster, client):
    before = replica_metrics(cluster.base_url)
    stream = chat(client, "Tell a long story.", stream=True, max_tokens=900, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    # The first chunk may carry only the role; each content chunk carries at least one token.
    received = sum(bool(next(chunks).choices[0].delta.content) for _ in range(3))
    stream.close()
    assert sum(requests_added(cluster.base_url, before, 1, timeout=10).values()) == 1
    after = replica_metrics(cluster.base_url)
    generated = sum(m["generated"] - before[r]["generated"] for r, m in after.items())
    assert max(received, 1) <= generated < 900, generated  # the replica stopped early, not at max_tokens


def test_a_killed_replica_fails_its_stream_cleanly_and_comes_back(cluster, client):
    stream = chat(client, "Tell a long story.", stream=True, max_tokens=900, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    next(chunks)
    deadline = time.monotonic() + 10
    while not (busy := [m for m in replica_metrics(cluster.base_url).values() if m.get("in_flight")]):
        assert time.monotonic() < deadline, "no replica reported the request in flight"
        time.sleep(0.2)
    (victim,) = busy
    os.kill(victim["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    with pytest.raises(openai.APIError, match="replica serving this request failed"):
        for _ in chunks:
            pass
    # Meanwhile the other replica answers, streamed and not.
    assert chat(client, "Still there?").choices[0].message.content
    assert "".join(c.choices[0].delta.content or "" for c in chat(client, "And now?", stream=True) if c.choices)
    while True:
        replicas = replica_metrics(cluster.base_url)
        if len(replicas) == 2 and victim["pid"] not in [m.get("pid") for m in replicas.values()]:
            break
        assert time.monotonic() - killed_at < 120, f"the killed replica did not come back: {replicas}"
        time.sleep(0.5)
    print(f"replica back after {time.monotonic() - killed_at:.1f} s")
    assert httpx.get(cluster.base_url + "/health").json()["replicas"]["healthy"] == 2
    assert chat(client, "Back to full strength?").choices[0].message.content


def test_stopping_the_cluster_stops_every_ray_process(cluster):
    names = {p.name() for p in psutil.Process(cluster.proc.pid).children(recursive=True)}
    assert {"raylet", "gcs_server"} <= names, names
    alive = cluster.stop()
    assert cluster.proc.returncode == 0, cluster.output()[-3000:]
    assert alive == [], [p.pid for p in alive]
