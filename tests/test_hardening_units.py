"""The hardening pieces without a server: admission, step failures in the actors, metrics, names, config."""

from __future__ import annotations

import anyio
import pytest

from transerve.actors.admission import Admission, EngineOverloadedError
from transerve.actors.executor import executor_actor
from transerve.actors.messages import ExecuteStep, RequestError, RequestFailed, StepOutput, TextDelta, TokenizedRequest, Usage
from transerve.actors.metrics import EngineMetrics
from transerve.actors.scheduler import SchedulerActor
from transerve.cli.main import build_parser
from transerve.cli.serve import config_from_args
from transerve.config import SchedulerConfig, ServerConfig
from transerve.engine import models
from transerve.engine.core import EngineCore
from transerve.engine.request import SamplingParams
from transerve.engine.stats import SchedulerStats
from transerve.engine.step import SampledTokens
from transerve.http.openapi import openapi_path


def test_admission_takes_a_full_batch_plus_the_queue_then_refuses():
    metrics = EngineMetrics()
    admission = Admission("m", SchedulerConfig(max_num_seqs=2, max_queued_requests=1), metrics)
    admission.enter(2)
    admission.enter(1)
    with pytest.raises(EngineOverloadedError):
        admission.enter(1)
    assert metrics.requests_rejected.labels("m")._value.get() == 1
    admission.leave(3)
    admission.enter(10)  # an idle engine takes a request of any size, or it could never run
    assert admission.num_in_flight == 10


class FlakyRunner:
    """Fails its first step, then answers token 7 for every sequence that samples."""

    def __init__(self, exc: Exception) -> None:
        self.exc, self.calls = exc, 0

    def execute(self, step):
        self.calls += 1
        if self.calls == 1:
            raise self.exc
        return SampledTokens({rid: 7 for rid, sample in zip(step.request_ids, step.samples) if sample})


async def _run_engine(runner, requests: list[TokenizedRequest], publish_stats=lambda stats: None,
                      async_scheduling: bool = True) -> tuple[list, EngineCore]:
    """Scheduler and executor actors around a fake runner; returns what reached the detokenizer."""
    core = EngineCore(SchedulerConfig(async_scheduling=async_scheduling), num_kv_blocks=16, block_size=4, max_model_len=64)
    inbox_send, inbox = anyio.create_memory_object_stream(16)
    exec_send, exec_recv = anyio.create_memory_object_stream(1)
    result_send, result_recv = anyio.create_memory_object_stream(1)
    detok_send, detok_recv = anyio.create_memory_object_stream(64)
    async with inbox_send:  # all queued before the scheduler starts, so they share the first step
        for request in requests:
            await inbox_send.send(request)
    scheduler = SchedulerActor(core, frozenset(), inbox, exec_send, result_recv, detok_send, publish_stats=publish_stats)
    async with anyio.create_task_group() as tg:
        tg.start_soon(scheduler.run)
        tg.start_soon(executor_actor, runner, exec_recv, result_send)
    return [m async for m in detok_recv], core


@pytest.mark.parametrize("exc", [RuntimeError("boom"), MemoryError("out of memory")])
def test_a_failed_step_fails_its_requests_frees_their_blocks_and_the_next_step_runs(exc, caplog):
    params = SamplingParams(max_tokens=3, temperature=0)
    first = [TokenizedRequest("a", (1, 2, 3), params), TokenizedRequest("b", (4, 5), params)]
    runner = FlakyRunner(exc)
    messages, core = anyio.run(_run_engine, runner, first)
    failed = [m for m in messages if isinstance(m, RequestFailed)]
    assert {m.request_id for m in failed} == {"a", "b"} and all(m.status_code == 500 for m in failed)
    assert core.num_failed_steps == 1 and core.block_manager.num_free_blocks == 16 and not core.has_work()
    assert caplog.text.count("model step failed") == 1
    # The same actors keep going: a request after the failure completes.
    runner.calls = 1
    messages, core = anyio.run(_run_engine, runner, [TokenizedRequest("c", (1, 2), params)])
    tokens = [t for m in messages if isinstance(m, StepOutput) for t in m.tokens]
    assert [t.token_id for t in tokens] == [7, 7, 7] and tokens[-1].finish_reason == "length"


def test_the_scheduler_actor_publishes_the_engine_state_at_start_and_after_each_step():
    # Step by step as the synchronous loop runs them (async scheduling runs one step more behind a failed one).
    params = SamplingParams(max_tokens=3, temperature=0)
    published: list[SchedulerStats] = []
    anyio.run(_run_engine, FlakyRunner(RuntimeError("boom")), [TokenizedRequest("a", (1, 2, 3), params)], published.append, False)
    assert published == [SchedulerStats(kv_blocks_free=16), SchedulerStats(kv_blocks_free=16, num_failed_steps=1)]
    published = []
    anyio.run(_run_engine, FlakyRunner(RuntimeError("boom")), [TokenizedRequest("a", (1, 2, 3), params)], published.append)
    assert published[0] == SchedulerStats(kv_blocks_free=16) and published[-1] == SchedulerStats(kv_blocks_free=16, num_failed_steps=1)
    for async_scheduling in (False, True):
        runner, published = FlakyRunner(RuntimeError("boom")), []
        runner.calls = 1  # no failure
        anyio.run(_run_engine, runner, [TokenizedRequest("c", (1, 2), params)], published.append, async_scheduling)
        assert published[0] == SchedulerStats(kv_blocks_free=16) and len(published) == 4  # at start, then after 3 steps
        assert all(s.num_running == 1 and s.kv_blocks_used >= 1 for s in published[1:3]), published
        assert published[-1] == SchedulerStats(kv_blocks_free=16)  # finished: its blocks are free again
    assert published[0] == SchedulerStats(kv_blocks_free=16) and len(published) == 4  # at start, then after 3 steps
    assert all(s.num_running == 1 and s.kv_blocks_used >= 1 for s in published[1:3]), published
    assert published[-1] == SchedulerStats(kv_blocks_free=16)  # finished: its blocks are free again


def test_request_metrics_record_tokens_latency_and_how_requests_ended():
    metrics = EngineMetrics()
    ok = metrics.track("m", 2)
    ok.on_event(TextDelta("a", (1,), index=0))
    ok.on_event(TextDelta("b", (2,), "length", Usage(5, 2), index=0))
    ok.on_event(RequestError("bad", 400, index=1))
    ok.finish()
    left = metrics.track("m")
    left.on_event(TextDelta("a", (1,)))
    left.finish()  # the client went away
    value = metrics.registry.get_sample_value
    assert value("transerve_requests_finished_total", {"model": "m", "reason": "length"}) == 1
    assert value("transerve_requests_finished_total", {"model": "m", "reason": "error"}) == 1
    assert value("transerve_requests_finished_total", {"model": "m", "reason": "abort"}) == 1
    assert value("transerve_prompt_tokens_total", {"model": "m"}) == 5
    assert value("transerve_generation_tokens_total", {"model": "m"}) == 3
    assert value("transerve_time_to_first_token_seconds_count", {"model": "m"}) == 2
    assert value("transerve_time_per_output_token_seconds_count", {"model": "m"}) == 1
    assert EngineMetrics().registry is not metrics.registry  # one registry per server


@pytest.mark.parametrize("spec", ["../x/y", "/abs/dir", "~/m", "a/b@../c", "a/b@/etc/passwd", "a/b:/etc/m.gguf",
                                  "a/b:../m.gguf", "a/b:m.bin", ".", "a\\b"])
def test_names_that_escape_the_cache_are_refused_before_any_file_is_read(spec):
    with pytest.raises(models.ModelNotFoundError, match="not a"):
        models.resolve(spec, allow_local_paths=False)


def test_server_flags_are_checked_and_the_key_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("TRANSERVE_API_KEY", "from-env")
    args = build_parser().parse_args(["serve", "m/x", "--allowed-origins", "https://a.example, http://localhost:3000",
                                      "--max-queued-requests", "0", "--shutdown-timeout", "2"])
    config = config_from_args(args)
    assert config.api_key == "from-env" and config.allowed_origins == ("https://a.example", "http://localhost:3000")
    assert config.engine.scheduler.max_queued_requests == 0 and config.shutdown_timeout_s == 2
    for bad in (dict(allowed_origins=("https://a.example/path",)), dict(allowed_origins=("a.example",)),
                dict(api_key=" "), dict(max_request_bytes=10), dict(shutdown_timeout_s=-1)):
        with pytest.raises(ValueError):
            ServerConfig(**bad)
    assert build_parser().parse_args(["serve"]).trust_remote_code is False


def test_openapi_paths_follow_quart_rules():
    assert openapi_path("/v1/models/<path:model_id>") == "/v1/models/{model_id}"
    assert openapi_path("/v1/chat/completions") == "/v1/chat/completions"
