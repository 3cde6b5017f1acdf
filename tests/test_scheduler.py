"""Block manager, scheduler policy and the step contract (engine/step.py), without a model: microseconds per test."""

from __future__ import annotations

import random

import numpy as np

from transerve.config import SchedulerConfig
from transerve.engine.batch import Rows, pack_step, record_samples, step_chunks, update_states
from transerve.engine.block_manager import BlockManager
from transerve.engine.core import EngineCore
from transerve.engine.request import Request, RequestStatus, SamplingParams
from transerve.engine.scheduler import Scheduler
from transerve.engine.step import SampledTokens, ScheduledStep


def request(rid: str, num_prompt: int, max_tokens: int = 8, first_token: int = 0) -> Request:
    return Request(rid, list(range(first_token, first_token + num_prompt)), SamplingParams(max_tokens=max_tokens, temperature=0), seed=0)


def chunks(scheduled: ScheduledStep) -> list[tuple[str, int, int, bool]]:
    """(request id, first position, tokens, samples) of every request in the step."""
    return list(zip(scheduled.request_ids, scheduled.num_computed_tokens, scheduled.num_scheduled_tokens, scheduled.samples))


def sample_all(scheduled: ScheduledStep, token: int) -> SampledTokens:
    return SampledTokens({rid: token for rid, _, _, sample in chunks(scheduled) if sample})


def run_to_completion(core: EngineCore, token: int = 7) -> int:
    steps = 0
    while core.has_work():
        step, scheduled = core.schedule()
        core.apply(step, sample_all(scheduled, token))
        steps += 1
    return steps


def test_blocks_are_allocated_on_demand_and_all_returned():
    manager = BlockManager(num_blocks=10, block_size=4)
    r = request("a", 6)
    assert manager.allocate_slots(r, 6) and len(r.block_ids) == 2
    r.num_computed_tokens = 6
    assert manager.allocate_slots(r, 2) and len(r.block_ids) == 2  # still fits in block 2
    r.num_computed_tokens = 8
    assert manager.allocate_slots(r, 1) and len(r.block_ids) == 3
    manager.free(r)
    assert manager.num_free_blocks == 10 and r.block_ids == []


def test_allocation_that_does_not_fit_changes_nothing():
    manager = BlockManager(num_blocks=2, block_size=4)
    r = request("a", 12)
    assert not manager.allocate_slots(r, 12)
    assert manager.num_free_blocks == 2 and r.block_ids == []


def test_prefix_blocks_are_shared_and_survive_until_reused():
    manager = BlockManager(num_blocks=8, block_size=4)
    a = request("a", 10)
    manager.allocate_slots(a, 10)
    a.num_computed_tokens = 10
    manager.cache_full_blocks(a)
    b = request("b", 10)
    manager.allocate_cached_prefix(b)
    assert b.block_ids == a.block_ids[:2] and b.num_cached_tokens == 8
    manager.free(a)
    manager.free(b)
    c = request("c", 10)  # all freed, but the hashes are still there
    manager.allocate_cached_prefix(c)
    assert c.num_computed_tokens == 8
    d = request("d", 10, first_token=100)  # different tokens: no hit
    manager.allocate_cached_prefix(d)
    assert d.num_computed_tokens == 0


def test_a_fully_cached_prompt_still_computes_its_last_token():
    manager = BlockManager(num_blocks=8, block_size=4)
    a = request("a", 8)
    manager.allocate_slots(a, 8)
    a.num_computed_tokens = 8
    manager.cache_full_blocks(a)
    b = request("b", 8)
    manager.allocate_cached_prefix(b)
    assert b.num_computed_tokens == 4


def test_long_prompts_are_prefilled_in_chunks_under_the_token_budget():
    core = EngineCore(SchedulerConfig(max_num_batched_tokens=16), num_kv_blocks=64, block_size=4, max_model_len=256)
    core.add_request(request("long", 40))
    core.add_request(request("short", 3))
    step, scheduled = core.schedule()
    assert chunks(scheduled) == [("long", 0, 16, False)]
    core.apply(step, SampledTokens())
    step, scheduled = core.schedule()
    assert chunks(scheduled) == [("long", 16, 16, False)]
    core.apply(step, SampledTokens())
    step, scheduled = core.schedule()
    # The rest of the long prompt, and the short request joins in the same step.
    assert chunks(scheduled) == [("long", 32, 8, True), ("short", 0, 3, True)]


def test_new_requests_join_a_running_batch_between_steps():
    core = EngineCore(SchedulerConfig(), num_kv_blocks=64, block_size=4, max_model_len=256)
    core.add_request(request("a", 5))
    step, _ = core.schedule()
    core.apply(step, SampledTokens({"a": 1}))
    core.add_request(request("b", 5, first_token=50))
    _, scheduled = core.schedule()
    assert [(rid, n) for rid, _, n, _ in chunks(scheduled)] == [("a", 1), ("b", 5)]


def test_preemption_recomputes_and_never_drops_a_request():
    core = EngineCore(SchedulerConfig(), num_kv_blocks=6, block_size=4, max_model_len=256)
    reqs = [request(str(i), 6, max_tokens=8) for i in range(3)]
    for r in reqs:
        core.add_request(r)
    run_to_completion(core)
    assert core.scheduler.num_preemptions > 0
    assert all(r.status is RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 8 for r in reqs)
    assert core.block_manager.num_free_blocks == 6


def test_max_tokens_is_capped_to_what_the_cache_can_hold_alone():
    core = EngineCore(SchedulerConfig(), num_kv_blocks=3, block_size=4, max_model_len=256)
    r = request("a", 6, max_tokens=100)
    assert core.add_request(r)
    run_to_completion(core)
    assert r.num_output_tokens == 6 and r.status is RequestStatus.FINISHED_LENGTH
    assert not core.add_request(request("b", 13))


def test_eos_and_stop_token_ids_finish_with_stop_unless_ignored():
    core = EngineCore(SchedulerConfig(), num_kv_blocks=16, block_size=4, max_model_len=256)
    a = Request("a", [1, 2], SamplingParams(max_tokens=8, temperature=0), seed=0, eos_token_ids=frozenset({7}))
    b = Request("b", [1, 2], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), seed=0, eos_token_ids=frozenset({7}))
    core.add_request(a)
    core.add_request(b)
    run_to_completion(core, token=7)
    assert a.status is RequestStatus.FINISHED_STOPPED and a.output_token_ids == [7]
    assert b.status is RequestStatus.FINISHED_LENGTH and b.num_output_tokens == 8


def test_abort_frees_blocks_at_once_even_mid_prefill():
    core = EngineCore(SchedulerConfig(max_num_batched_tokens=8), num_kv_blocks=16, block_size=4, max_model_len=256)
    core.add_request(request("a", 30))
    step, _ = core.schedule()
    core.apply(step, SampledTokens())
    assert core.block_manager.num_free_blocks < 16
    out = core.abort("a")
    assert out.status is RequestStatus.FINISHED_ABORTED
    assert core.block_manager.num_free_blocks == 16 and not core.has_work()
    assert core.abort("a") is None


def test_max_num_seqs_bounds_the_batch():
    scheduler = Scheduler(SchedulerConfig(max_num_seqs=2), BlockManager(64, 4), max_model_len=256)
    for i in range(4):
        scheduler.add(request(str(i), 3))
    assert len(scheduler.schedule().scheduled) == 2


def test_a_request_crosses_to_the_runner_once_then_as_deltas():
    core = EngineCore(SchedulerConfig(), num_kv_blocks=16, block_size=4, max_model_len=256)
    params = SamplingParams(max_tokens=8, temperature=0, min_tokens=2)
    core.add_request(Request("a", [5, 6, 7, 8, 9, 10], params, seed=3, eos_token_ids=frozenset({2})))
    step, scheduled = core.schedule()
    (new,) = scheduled.new_requests
    assert (new.request_id, new.prompt_token_ids, new.output_token_ids, new.sampling_params, new.seed) == \
        ("a", (5, 6, 7, 8, 9, 10), (), params, 3)
    assert chunks(scheduled) == [("a", 0, 6, True)] and len(scheduled.new_block_ids[0]) == 2
    assert scheduled.banned_token_ids == ((2,),)  # end of sequence is banned until min_tokens
    new_blocks = []
    for position in range(6, 10):
        core.apply(step, SampledTokens({"a": 11}))
        step, scheduled = core.schedule()
        assert scheduled.new_requests == () and chunks(scheduled) == [("a", position, 1, True)]
        new_blocks.append(len(scheduled.new_block_ids[0]))
        assert scheduled.banned_token_ids == (((2,),) if position < 7 else ((),))
    assert new_blocks == [0, 0, 1, 0]  # a third block when position 8 is reached


def test_finished_aborted_and_preempted_requests_are_freed_in_the_next_step():
    core = EngineCore(SchedulerConfig(), num_kv_blocks=16, block_size=4, max_model_len=256)
    core.add_request(request("done", 3, max_tokens=1))
    core.add_request(request("gone", 3))
    step, scheduled = core.schedule()
    core.apply(step, sample_all(scheduled, 7))
    core.abort("gone")
    core.add_request(request("next", 3))
    _, scheduled = core.schedule()
    assert sorted(scheduled.freed_request_ids) == ["done", "gone"]
    assert [n.request_id for n in scheduled.new_requests] == ["next"]

    core = EngineCore(SchedulerConfig(), num_kv_blocks=6, block_size=4, max_model_len=256)
    for i in range(3):
        core.add_request(request(str(i), 6))
    outputs: dict[str, list[int]] = {str(i): [] for i in range(3)}
    preempted = None
    while preempted is None:
        step, scheduled = core.schedule()
        if step.preempted_request_ids:
            preempted = step.preempted_request_ids[0]
            assert preempted in scheduled.freed_request_ids and preempted not in scheduled.request_ids
        core.apply(step, sample_all(scheduled, 7))
        for rid, _, _, sample in chunks(scheduled):
            outputs[rid] += [7] if sample else []
    while preempted not in [n.request_id for n in scheduled.new_requests]:
        step, scheduled = core.schedule()
        core.apply(step, sample_all(scheduled, 7))
    (resumed,) = [n for n in scheduled.new_requests if n.request_id == preempted]
    assert resumed.output_token_ids == tuple(outputs[preempted]) and resumed.output_token_ids  # recomputed, not lost


def f32(x: float) -> float:
    """x as the runner's float32 arrays hold it."""
    return float(np.float32(x))


def test_runner_state_kept_by_deltas_equals_the_core_requests_after_every_step():
    """Random arrivals, shared prefixes, chunked prefill, aborts, end of sequence and preemption: after
    every step, what the runner keeps from deltas is what the core's requests hold, its token, block table
    and sampling-parameter rows included, and the packed step equals one rebuilt from the core's requests."""
    rng = random.Random(0)
    seen = {"preempted": 0, "prefix_hits": 0, "aborted": 0, "chunked": 0, "decode_steps": 0, "penalties": 0,
            "logit_edits": 0}
    for trial in range(30):
        core = EngineCore(SchedulerConfig(max_num_seqs=rng.choice([2, 4, 8]), max_num_batched_tokens=rng.choice([8, 16, 64])),
                          num_kv_blocks=rng.choice([10, 16, 32]), block_size=4, max_model_len=64)
        prefixes = [[rng.randrange(1, 20) for _ in range(8)] for _ in range(2)]
        states: dict = {}
        rows = Rows(max_blocks_per_seq=16, num_rows=2, num_token_columns=4)  # rows and token columns grow
        for i in range(rng.randint(4, 12)):
            prompt = rng.choice(prefixes)[: rng.randint(0, 8)] + [rng.randrange(1, 20) for _ in range(rng.randint(1, 12))]
            params = SamplingParams(max_tokens=rng.randint(1, 12), temperature=rng.choice([0.0, 0.5, 1.0]),
                                    top_k=rng.choice([0, 5]), top_p=rng.choice([1.0, 0.9]), min_p=rng.choice([0.0, 0.1]),
                                    **rng.choice([{}, {}, {"repetition_penalty": 1.2}, {"frequency_penalty": 0.5},
                                                  {"logit_bias": ((3, 1.5),)}, {"num_logprobs": 2}, {"min_tokens": 3}]))
            core.add_request(Request(f"{trial}-{i}", prompt, params, seed=rng.randrange(2**62), eos_token_ids=frozenset({0})))
        while core.has_work():
            if core.requests and rng.random() < 0.03:
                core.abort(rng.choice(sorted(core.requests)))
                seen["aborted"] += 1
                continue
            step, scheduled = core.schedule()
            seen["preempted"] += step.num_preempted
            if not scheduled.num_requests:
                continue
            update_states(states, rows, scheduled)
            packed = pack_step(states, rows, scheduled, 4)
            assert set(states) == {r.request_id for r in core.scheduler.running}
            for item, (state, start, n) in zip(step.scheduled, step_chunks(states, scheduled)):
                r = item.request
                assert (state.request_id, start, n) == (r.request_id, r.num_computed_tokens, item.num_new_tokens)
                assert rows.token_ids(state.row) == r.prompt_token_ids + r.output_token_ids
                assert rows.block_ids(state.row) == r.block_ids
                seen["prefix_hits"] += item.is_new and r.num_computed_tokens > 0
                seen["chunked"] += not item.samples
            assert packed.input_ids.tolist() == [t for item in step.scheduled for t in item.request.token_ids(
                item.request.num_computed_tokens, item.request.num_computed_tokens + item.num_new_tokens)]
            assert packed.slots.tolist() == [r.block_ids[p // 4] * 4 + p % 4 for item in step.scheduled if (r := item.request)
                                             for p in range(r.num_computed_tokens, r.num_computed_tokens + item.num_new_tokens)]
            lengths = [item.num_new_tokens for item in step.scheduled]
            assert packed.positions.tolist() == [p for item in step.scheduled for p in range(
                item.request.num_computed_tokens, item.request.num_computed_tokens + item.num_new_tokens)]
            assert packed.seq_lens.tolist() == [item.request.num_computed_tokens + item.num_new_tokens for item in step.scheduled]
            assert packed.query_start_loc.tolist() == [sum(lengths[:k]) for k in range(len(lengths) + 1)]
            assert packed.sample_rows.tolist() == [sum(lengths[: k + 1]) - 1 for k, item in enumerate(step.scheduled) if item.samples]
            assert list(packed.bans) == [b for b, sample in zip(scheduled.banned_token_ids, scheduled.samples) if sample]
            seen["decode_steps"] += set(lengths) == {1} and all(scheduled.samples)
            width = max(len(item.request.block_ids) for item in step.scheduled)
            assert packed.block_tables.tolist() == [item.request.block_ids + [0] * (width - len(item.request.block_ids))
                                                    for item in step.scheduled]
            requests = [core.requests[rid] for rid in packed.sampled_ids]
            assert list(packed.sampled_ids) == [item.request.request_id for item in step.scheduled if item.samples]
            assert [column.tolist() for column in packed.sampling] == [
                [f32(r.sampling_params.temperature) for r in requests], [r.sampling_params.top_k for r in requests],
                [f32(r.sampling_params.top_p) for r in requests], [f32(r.sampling_params.min_p) for r in requests],
                [r.seed for r in requests], [len(r.output_token_ids) for r in requests],
            ]
            special = [p.logit_bias or p.has_penalties or p.num_logprobs is not None for r in requests if (p := r.sampling_params)]
            assert packed.params == ([r.sampling_params for r in requests] if any(special) else None)
            if any(r.sampling_params.has_penalties for r in requests):
                seen["penalties"] += 1
                rep, presence, frequency, prompts, outputs = (a.tolist() for a in packed.penalties)
                assert (rep, presence, frequency) == tuple([f32(getattr(r.sampling_params, name)) for r in requests] for name in (
                    "repetition_penalty", "presence_penalty", "frequency_penalty"))
                on = [r.sampling_params.has_penalties for r in requests]
                assert [[t for t in row if t >= 0] for row in prompts] == [r.prompt_token_ids if p else [] for r, p in zip(requests, on)]
                assert [[t for t in row if t >= 0] for row in outputs] == [r.output_token_ids if p else [] for r, p in zip(requests, on)]
            else:
                assert packed.penalties == ()
            edits = [(i, t, f32(v)) for i, r in enumerate(requests) for t, v in r.sampling_params.logit_bias]
            edits += [(i, t, float("-inf")) for i, banned in enumerate(packed.bans) for t in banned]
            if edits:
                seen["logit_edits"] += 1
                assert list(zip(*(a.tolist() for a in packed.logit_edits))) == edits
            else:
                assert packed.logit_edits == ()
            sampled = SampledTokens({rid: rng.randrange(20) for rid in packed.sampled_ids})
            record_samples(packed, rows, sampled)
            core.apply(step, sampled)
        assert core.block_manager.num_free_blocks == core.block_manager.num_blocks
    assert all(seen.values()), seen
