"""A server people leave running: auth, CORS, body limits, hostile model names, /metrics, clients that
vanish, bursts past the queue, a KV cache too small for the batch, a failing model step, SIGTERM.

One live server serves the whole module (its start is the slow part). The SIGTERM test stops it,
so it comes last.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from unittest import mock

import httpx
import openai
import pytest

from conftest import LiveServer
from hardening_helpers import FAIL_AT_POSITION, MAGIC_PROMPT, make_faulty_repo, metric, wait_until
from openai_server import async_sdk_client, check_body, checked, sdk_client

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ORIGIN = "https://good.example"
NUM_KV_BLOCKS = 12  # of 16 tokens: three requests of ~70 tokens do not fit together


@pytest.fixture(scope="module")
def server(tiny_repos, tokenizer, tmp_path_factory):
    make_faulty_repo(tokenizer, tmp_path_factory.mktemp("faulty"))
    with mock.patch.dict(os.environ, {"TRANSERVE_API_KEY": KEY}):  # the key from the environment, as documented
        srv = LiveServer("--no-preload", "--trust-remote-code", "--num-kv-blocks", str(NUM_KV_BLOCKS),
                         "--max-num-seqs", "4", "--max-queued-requests", "4", "--max-num-batched-tokens", "128",
                         "--allowed-origins", ORIGIN, "--max-request-bytes", "65536", "--shutdown-timeout", "3")
    for model in ("tiny/llama", "tiny/faulty"):
        assert chat(srv, model=model, max_tokens=1).status_code == 200
    yield srv
    assert srv.stop() == 0, srv.output()


def chat(server, model="tiny/llama", content="Hi", headers=None, **fields) -> httpx.Response:
    return checked(httpx.post(server.base_url + "/v1/chat/completions", headers={**AUTH, **(headers or {})}, timeout=120,
                              json={"model": model, "messages": [{"role": "user", "content": content}], "temperature": 0,
                                    **fields}))


def kv_used(server, model="tiny/llama") -> float:
    return metric(server.base_url, "transerve_kv_blocks_used", model=model)


def test_api_key_guards_the_api_but_not_health_or_metrics(server):
    url = server.base_url
    missing = httpx.post(url + "/v1/chat/completions", json={"model": "tiny/llama", "messages": []})
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["type"] == "invalid_request_error"
    wrong = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer test-kex"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(url + "/v1/models", headers={"Authorization": KEY}).status_code == 401  # not Bearer
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        sdk_client(url, "nope").models.list()
    client = sdk_client(url, KEY)
    assert "tiny/llama" in {m.id for m in client.models.list().data}


def test_cors_preflight_and_responses(server):
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization, content-type"}
    good = httpx.options(server.base_url + "/v1/chat/completions", headers={"Origin": ORIGIN, **preflight})
    assert good.status_code == 200  # no API key on a preflight: browsers never send one
    assert good.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in good.headers["access-control-allow-methods"]
    assert {"authorization", "content-type"} <= {h.strip().lower() for h in good.headers["access-control-allow-headers"].split(",")}
    assert "origin" in good.headers["vary"].lower()
    evil = httpx.options(server.base_url + "/v1/chat/completions", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in evil.headers
    answer = chat(server, headers={"Origin": ORIGIN}, max_tokens=2)
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ORIGIN
    refused = httpx.get(server.base_url + "/v1/models", headers={"Origin": ORIGIN})  # the browser may read the 401
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN


def test_request_bodies_over_the_limit_get_413(server):
    too_big = chat(server, content="x" * 70_000)
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    chunked = httpx.post(server.base_url + "/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"},
                         content=iter([b'{"model": "tiny/llama", "messages": "', b"y" * 40_000, b"z" * 40_000, b'"}']))
    assert chunked.status_code == 413
    assert chat(server, max_tokens=1).status_code == 200


@pytest.mark.parametrize("name", [
    "../../etc/passwd", "/etc/passwd", "~/models/x", "./tiny", "tiny/llama@../../../../etc", "tiny/llama@/etc/passwd",
    "tiny/llama:/etc/x.gguf", "tiny/llama:../../x.gguf", "tiny\\llama", "SNAPSHOT",
])
def test_model_names_never_name_a_path(server, tiny_repos, name):
    if name == "SNAPSHOT":  # a real model directory on this machine, by absolute path
        name = str(tiny_repos["tiny/llama"])
    reply = chat(server, model=name, max_tokens=1)
    assert reply.status_code == 404, reply.text
    assert reply.json()["error"]["param"] == "model"


def test_prompt_plus_max_tokens_beyond_the_context_is_a_400_up_front(server):
    reply = chat(server, max_tokens=1024, stream=True)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "max_tokens"


def test_metrics_cover_requests_tokens_latency_and_engine_state(server):
    chat(server, max_tokens=3)
    httpx.get(server.base_url + "/v1/models")  # a 401
    text = httpx.get(server.base_url + "/metrics").text
    for name in ("transerve_prompt_tokens_total", "transerve_generation_tokens_total", "transerve_requests_finished_total",
                 "transerve_time_to_first_token_seconds_bucket", "transerve_time_per_output_token_seconds_bucket",
                 "transerve_e2e_request_latency_seconds_bucket", "transerve_num_requests_waiting",
                 "transerve_num_requests_running", "transerve_kv_blocks_used", "transerve_kv_blocks_free",
                 "transerve_num_preemptions_total", "transerve_step_failures_total", "process_resident_memory_bytes"):
        assert name in text, name
    url = server.base_url
    assert metric(url, "transerve_http_requests_total", endpoint="/v1/chat/completions", method="POST", status="200") >= 1
    assert metric(url, "transerve_http_requests_total", endpoint="/v1/models", method="GET", status="401") >= 1
    assert kv_used(server) + metric(url, "transerve_kv_blocks_free", model="tiny/llama") == NUM_KV_BLOCKS


def test_a_client_that_disconnects_mid_stream_frees_its_blocks(server):
    aborted = metric(server.base_url, "transerve_requests_finished_total", model="tiny/llama", reason="abort")
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", headers=AUTH, timeout=60, json={
        "model": "tiny/llama", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 150, "ignore_eos": True,
        "stream": True,
    }) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
        assert kv_used(server) > 0
    # Leaving the block closed the connection: the request is aborted through every actor.
    assert wait_until(lambda: kv_used(server) == 0), "the aborted request still holds KV blocks"
    assert metric(server.base_url, "transerve_num_requests_running", model="tiny/llama") == 0
    assert metric(server.base_url, "transerve_requests_finished_total", model="tiny/llama", reason="abort") == aborted + 1


def test_a_burst_past_the_queue_bound_gets_429s_and_the_rest_complete(server):
    async def burst():
        async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH, timeout=120) as client:
            replies = await asyncio.gather(*[client.post("/v1/chat/completions", json={
                "model": "tiny/llama", "messages": [{"role": "user", "content": f"Burst {i}"}], "max_tokens": 16,
                "ignore_eos": True}) for i in range(16)])
            return [checked(r) for r in replies]

    replies = asyncio.run(burst())
    ok = [r for r in replies if r.status_code == 200]
    rejected = [r for r in replies if r.status_code == 429]
    assert len(ok) + len(rejected) == 16, [r.status_code for r in replies]
    assert rejected and len(ok) >= 8  # 4 running plus 4 queued are always admitted
    for r in rejected:
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
    assert all(r.json()["choices"][0]["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 16 for r in ok)
    assert metric(server.base_url, "transerve_requests_rejected_total", model="tiny/llama") == len(rejected)
    assert wait_until(lambda: kv_used(server) == 0)


def test_a_kv_cache_too_small_for_the_batch_preempts_and_answers_as_alone(server):
    prompts = [f"Tell story number {i} about " + "the sea and the sky " * (i + 1) for i in range(3)]
    alone = [chat(server, content=p, max_tokens=30, ignore_eos=True).json()["choices"][0]["message"]["content"] for p in prompts]
    preemptions = metric(server.base_url, "transerve_num_preemptions_total", model="tiny/llama")

    async def together():
        async with async_sdk_client(server.base_url, KEY) as client:
            replies = await asyncio.gather(*[client.chat.completions.create(
                model="tiny/llama", messages=[{"role": "user", "content": p}], max_tokens=30, temperature=0,
                extra_body={"ignore_eos": True}) for p in prompts])
        return [r.choices[0].message.content for r in replies]

    assert asyncio.run(together()) == alone
    assert metric(server.base_url, "transerve_num_preemptions_total", model="tiny/llama") > preemptions
    assert wait_until(lambda: kv_used(server) == 0)


def test_a_failed_model_step_fails_its_requests_and_the_server_keeps_serving(server):
    failed = chat(server, model="tiny/faulty", content=MAGIC_PROMPT, max_tokens=5)
    assert failed.status_code == 500, failed.text
    assert "injected failure: magic token" in failed.json()["error"]["message"]
    # A step failing mid-stream ends the stream with an error event, then [DONE].
    with httpx.stream("POST", server.base_url + "/v1/chat/completions", headers=AUTH, timeout=120, json={
        "model": "tiny/faulty", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": FAIL_AT_POSITION,
        "ignore_eos": True, "stream": True,
    }) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    check_body("/v1/chat/completions", 200, "text/event-stream", "\n".join(lines))
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert any(e.get("choices") and e["choices"][0]["delta"].get("content") for e in events[:-1])
    assert "injected failure: position" in events[-1]["error"]["message"]
    # The same model, and the others, keep answering.
    assert chat(server, model="tiny/faulty", max_tokens=3).json()["choices"][0]["finish_reason"] == "length"
    assert chat(server, max_tokens=3).status_code == 200
    assert metric(server.base_url, "transerve_step_failures_total", model="tiny/faulty") == 2
    assert wait_until(lambda: kv_used(server, "tiny/faulty") == 0)
    # A failure that repeats is logged once with its traceback, then in one line.
    assert chat(server, model="tiny/faulty", content=MAGIC_PROMPT, max_tokens=5).status_code == 500
    assert wait_until(lambda: "model step failed again (2 times so far)" in server.output(), timeout=5)
    assert server.output().count("model step failed; failing") == 2


def test_sigterm_drains_in_flight_streams_within_the_bound_then_exits_0(server):
    """The short stream finishes normally; the long one may outlast --shutdown-timeout (3 s) and is then
    cut; either way the server stops accepting at once and exits 0 soon after the bound."""
    lines: dict[str, list[str]] = {"short": [], "long": []}

    def stream(name: str, max_tokens: int) -> None:
        try:
            with httpx.stream("POST", server.base_url + "/v1/chat/completions", headers=AUTH, timeout=120, json={
                "model": "tiny/llama", "messages": [{"role": "user", "content": name}], "max_tokens": max_tokens,
                "ignore_eos": True, "stream": True,
            }) as response:
                lines[name].extend(line for line in response.iter_lines() if line)
        except httpx.TransportError:
            lines[name].append("cut")

    readers = [threading.Thread(target=stream, args=args) for args in (("short", 8), ("long", 160))]
    for reader in readers:
        reader.start()
    assert wait_until(lambda: all(len(v) >= 2 for v in lines.values()), timeout=60)
    sigterm_at = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            httpx.get(server.base_url + "/health", timeout=2)
        except httpx.TransportError:
            return True
        return False

    assert wait_until(refused, timeout=5), "still accepting connections after SIGTERM"
    for reader in readers:
        reader.join(60)
    assert lines["short"][-1] == "data: [DONE]", lines["short"][-3:]
    assert json.loads(lines["short"][-2][6:])["choices"][0]["finish_reason"] == "length"
    assert not any(reader.is_alive() for reader in readers)  # the long stream ended too, whole or cut
    assert server.proc.wait(30) == 0, server.output()
    assert time.monotonic() - sigterm_at < 3 + 15  # the bound, plus the actors' own drain
