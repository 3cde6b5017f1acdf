"""Schemathesis against /openapi.json: bounded in examples and time, no 5xx and no hang.

The server pins tiny/llama, so whatever `model` the fuzzer sends, valid bodies reach the engine; a
short context keeps every generation to a few tokens.
"""

from __future__ import annotations

import time
from collections import Counter

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from conftest import LiveServer

EXAMPLES = {GenerationMode.POSITIVE: 30, GenerationMode.NEGATIVE: 15}  # per operation, at most
REQUEST_TIMEOUT_S = 30  # a request that takes longer counts as a hang
BUDGET_S = 90  # the whole run; each operation gets its share, so a slow machine fuzzes fewer examples


@pytest.fixture(scope="module")
def server(tiny_repos):
    srv = LiveServer("tiny/llama", "--max-model-len", "36", "--num-kv-blocks", "64", "--max-request-bytes", "65536")
    yield srv
    assert srv.stop() == 0, srv.output()


def test_the_document_describes_every_route_and_every_accepted_field(server):
    from transerve.http.protocol import REQUESTS
    from transerve.http.protocol.base import REJECTED

    doc = httpx.get(server.base_url + "/openapi.json").json()
    assert doc["openapi"].startswith("3.1")
    assert {"/v1/chat/completions", "/v1/audio/transcriptions", "/v1/models", "/v1/models/{model_id}", "/health",
            "/metrics"} <= set(doc["paths"])
    for endpoint, model in REQUESTS.items():
        accepted = {name for name, (status, _) in model.fields().items() if status != REJECTED}
        body = doc["paths"][endpoint]["post"]["requestBody"]["content"][model.media_type]["schema"]
        schema = doc["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
        assert set(schema["properties"]) == accepted and schema["additionalProperties"] is False
        assert all(p["x-status"] != REJECTED and (p.get("description") or p["x-status"]) for p in schema["properties"].values())


@pytest.mark.timeout(BUDGET_S + 60)
def test_fuzzing_the_api_finds_no_server_error_and_no_hang(server):
    schema = schemathesis.openapi.from_dict(httpx.get(server.base_url + "/openapi.json").json())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6
    deadline = time.monotonic() + BUDGET_S
    calls = 0
    statuses: Counter[tuple[str, int]] = Counter()
    for i, operation in enumerate(operations):
        share = (deadline - time.monotonic()) / (len(operations) - i)
        stop_at = time.monotonic() + share
        for mode, examples in EXAMPLES.items():
            if time.monotonic() > stop_at:
                break

            @settings(max_examples=examples, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case) -> None:
                nonlocal calls
                if time.monotonic() > stop_at:
                    return  # this operation's share of the budget is spent
                response = case.call(base_url=server.base_url, timeout=REQUEST_TIMEOUT_S)
                calls += 1
                statuses[operation.label, response.status_code] += 1
                case.validate_response(response, checks=[not_a_server_error])

            try:
                run()
            except Unsatisfiable:
                # Nothing to make invalid in an operation without parameters or body (GET /health).
                assert mode is GenerationMode.NEGATIVE, operation.label
    print(sorted(statuses.items()))
    assert calls >= 3 * len(operations)
    # Valid bodies reach the engine and get answers, not only validation errors.
    assert any(status == 200 and label.startswith("POST") for (label, status) in statuses), statuses
    assert httpx.get(server.base_url + "/health", timeout=5).status_code == 200
    assert "Traceback" not in server.output(), server.output()[-3000:]
