"""Block manager and scheduler policy, without a model: microseconds per test."""

from __future__ import annotations

from transerve.config import SchedulerConfig
from transerve.engine.block_manager import BlockManager
from transerve.engine.core import EngineCore
from transerve.engine.request import Request, RequestStatus, SamplingParams
from transerve.engine.scheduler import Scheduler


def request(rid: str, num_prompt: int, max_tokens: int = 8, first_token: int = 0) -> Request:
    return Request(rid, list(range(first_token, first_token + num_prompt)), SamplingParams(max_tokens=max_tokens, temperature=0), seed=0)


def run_to_completion(core: EngineCore, token: int = 7) -> int:
    steps = 0
    while core.has_work():
        step, inputs = core.schedule()
        core.apply(step, {s.request_id: token for s in inputs if s.sample})
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
    step, inputs = core.schedule()
    assert [(s.request_id, len(s.token_ids), s.sample) for s in inputs] == [("long", 16, False)]
    core.apply(step, {})
    step, inputs = core.schedule()
    assert [(s.request_id, s.start_position, len(s.token_ids)) for s in inputs] == [("long", 16, 16)]
    core.apply(step, {})
    step, inputs = core.schedule()
    # The rest of the long prompt, and the short request joins in the same step.
    assert [(s.request_id, len(s.token_ids), s.sample) for s in inputs] == [("long", 8, True), ("short", 3, True)]


def test_new_requests_join_a_running_batch_between_steps():
    core = EngineCore(SchedulerConfig(), num_kv_blocks=64, block_size=4, max_model_len=256)
    core.add_request(request("a", 5))
    step, _ = core.schedule()
    core.apply(step, {"a": 1})
    core.add_request(request("b", 5, first_token=50))
    _, inputs = core.schedule()
    assert [(s.request_id, len(s.token_ids)) for s in inputs] == [("a", 1), ("b", 5)]


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
    core.apply(step, {})
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
