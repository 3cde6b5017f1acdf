"""Async scheduling (step N+1 scheduled while step N runs) gives exactly the tokens of synchronous scheduling."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import anyio
import pytest
import torch

from conftest import LiveServer
from openai_server import sdk_client
from transerve.actors.assembly import load
from transerve.actors.executor import executor_actor
from transerve.actors.messages import ExecuteStep
from transerve.config import CacheConfig, EngineConfig, SchedulerConfig
from transerve.engine.core import EngineCore, generate, run_steps
from transerve.engine.request import Request, SamplingParams

BLOCK_SIZE = 16
EOS = frozenset({2})


@pytest.fixture(scope="module")
def runner(tiny_repos):
    config = EngineConfig(cache=CacheConfig(block_size=BLOCK_SIZE, num_kv_blocks=128), scheduler=SchedulerConfig(max_num_seqs=16))
    return load("tiny/llama", config, allow_download=False).runner


def engine(pipelined: bool, num_kv_blocks: int = 128, budget: int = 32) -> EngineCore:
    config = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=budget, async_scheduling=pipelined)
    return EngineCore(config, num_kv_blocks, BLOCK_SIZE, max_model_len=1024)


class Watched:
    """The runner, counting the decodes it ran whose input token the core had not been given yet."""

    def __init__(self, runner, core: EngineCore) -> None:
        self.runner, self.core, self.ran_ahead = runner, core, 0

    def execute(self, step):
        for request_id, start, n in zip(step.request_ids, step.num_computed_tokens, step.num_scheduled_tokens):
            self.ran_ahead += start + n > self.core.requests[request_id].num_tokens
        return self.runner.execute(step)


def run(runner, specs, pipelined: bool, num_kv_blocks: int, abort_after: dict[str, int] | None = None):
    """Run fresh requests from (id, prompt, params, seed) specs; a request in abort_after is aborted once it
    has that many tokens, as the detokenizer aborts one whose text reached a stop string."""
    core = engine(pipelined, num_kv_blocks)
    tag = "async-" if pipelined else "sync-"  # the runner is shared: ids unique to the run
    for request_id, prompt, params, seed in specs:
        assert core.add_request(Request(tag + request_id, list(prompt), params, seed=seed, eos_token_ids=EOS))
    outputs = {request_id: [] for request_id, *_ in specs}
    watched = Watched(runner, core)
    for step_outputs in run_steps(core, watched, pipelined):
        for out in step_outputs:
            outputs[out.request_id.removeprefix(tag)].append(out.token_id)
        for request_id, n in (abort_after or {}).items():
            if len(outputs[request_id]) >= n:
                core.abort(tag + request_id)
    assert core.block_manager.num_free_blocks == num_kv_blocks and not core.requests
    return outputs, core.scheduler.num_preemptions, watched.ran_ahead


def prompts(lengths: list[int], seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1000, (n,), generator=g).tolist() for n in lengths]


def mixed_specs(stop_token: int, bad_word: tuple[int, int]) -> list[tuple[str, list[int], SamplingParams, int]]:
    """Greedy and seeded requests, prompts past the 32-token budget (chunked prefill), n > 1 (one prompt, three
    seeds, sharing its cached prefix), a stop token, bans (min_tokens, n-grams, a bad word), max_tokens 1 and 2."""
    ps = prompts([5, 17, 40, 100, 3, 64, 33, 70, 20, 48], seed=7)
    greedy = SamplingParams(max_tokens=40, temperature=0.0)
    seeded = SamplingParams(max_tokens=32, temperature=1.0, top_p=0.9, top_k=50)
    specs = [(f"g{i}", p, greedy, 0) for i, p in enumerate(ps[:4])]
    specs += [(f"s{i}", p, seeded, 100 + i) for i, p in enumerate(ps[4:7])]
    specs += [(f"n{j}", ps[7], seeded, 200 + j) for j in range(3)]
    specs += [("stop", ps[0], SamplingParams(max_tokens=40, temperature=0.0, stop_token_ids=(stop_token,)), 0),
              ("bans", ps[8], SamplingParams(max_tokens=24, temperature=1.0, min_tokens=20, stop_token_ids=(stop_token,),
                                             no_repeat_ngram_size=2), 5),
              ("bad word", ps[0], SamplingParams(max_tokens=40, temperature=0.0, bad_words_ids=(bad_word,)), 0),
              ("one", ps[9], SamplingParams(max_tokens=1, temperature=0.0), 0),
              ("two", ps[9][:40], SamplingParams(max_tokens=2, temperature=0.0), 0)]
    return specs


@pytest.mark.parametrize("num_kv_blocks", [128, 28], ids=["roomy", "preempting"])
def test_async_scheduling_gives_the_tokens_of_synchronous_scheduling(runner, num_kv_blocks):
    # g0's greedy 7th token stops "stop" (same prompt) part way; its 3rd and 4th are "bad word"'s bad word, whose
    # ban depends on the token before: a request with bans waits for its last token rather than run ahead.
    first = generate(engine(False), runner, [Request("probe", prompts([5], seed=7)[0], SamplingParams(max_tokens=8, temperature=0.0), seed=0)])
    first = first["probe"]
    specs = mixed_specs(stop_token=first[6], bad_word=(first[2], first[3]))
    aborts = {"g1": 5, "s0": 9, "n1": 3}  # aborted with their next token already in flight (async)
    sync, sync_preemptions, sync_ahead = run(runner, specs, False, num_kv_blocks, aborts)
    pipelined, preemptions, ahead = run(runner, specs, True, num_kv_blocks, aborts)
    assert pipelined == sync
    assert len(sync["stop"]) == 7 and [len(sync[r]) for r in aborts] == list(aborts.values())
    assert len(sync["one"]) == 1 and len(sync["two"]) == 2 and len(sync["bans"]) >= 20
    assert sync["bad word"][:3] == first[:3] and sync["bad word"][3] != first[3]
    assert sync_ahead == 0 and ahead > 100  # the async run did run decodes ahead of the core
    if num_kv_blocks < 128:
        assert sync_preemptions > 0 and preemptions > 0


class FailsFirst:
    """Raises on its first step before running any of it, as a model that fails at its first layer."""

    def __init__(self, runner) -> None:
        self.runner, self.calls = runner, 0

    def execute(self, step):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("boom")
        return self.runner.execute(step)


def test_a_failed_step_does_not_fail_the_other_requests_of_the_step_queued_behind_it(runner):
    greedy = SamplingParams(max_tokens=8, temperature=0.0)
    doomed_prompt, late_prompt = prompts([10, 12], seed=9)
    expected = generate(engine(False), runner, [Request("f-ref", late_prompt, greedy, seed=0)])["f-ref"]

    core = engine(True)
    core.add_request(Request("f-doomed", doomed_prompt, greedy, seed=0))
    step, scheduled = core.schedule()
    core.add_request(Request("f-late", late_prompt, greedy, seed=0))
    next_step, next_scheduled = core.schedule()  # before the first step's result: f-doomed runs ahead
    assert set(next_scheduled.request_ids) == {"f-doomed", "f-late"}

    async def drive() -> dict[str, list[int]]:
        outputs = {"f-doomed": [], "f-late": []}
        exec_send, exec_recv = anyio.create_memory_object_stream(2)
        result_send, result_recv = anyio.create_memory_object_stream(2)
        async with anyio.create_task_group() as tg, exec_send, result_recv:
            tg.start_soon(executor_actor, FailsFirst(runner), exec_recv, result_send)
            await exec_send.send(ExecuteStep(scheduled))
            await exec_send.send(ExecuteStep(next_scheduled))
            failed = await result_recv.receive()
            assert failed.error == "RuntimeError: boom"
            assert [out.request_id for out in core.fail(step)] == ["f-doomed"]
            result = await result_recv.receive()
            assert result.error is None
            pending = [(next_step, result.sampled)]
            while pending:
                for out in core.apply(*pending.pop()):
                    outputs[out.request_id].append(out.token_id)
                if core.has_work():
                    step_, scheduled_ = core.schedule()
                    await exec_send.send(ExecuteStep(scheduled_))
                    pending.append((step_, (await result_recv.receive()).sampled))
        return outputs

    outputs = anyio.run(drive)
    assert outputs == {"f-doomed": [], "f-late": expected}
    assert "f-doomed" not in runner.requests  # its id came back freed, and the runner dropped it
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks


@pytest.fixture(scope="module")
def servers(tiny_repos):
    """The same tiny model served with and without async scheduling; a KV cache small enough to preempt."""
    common = ("tiny/llama", "--num-kv-blocks", "24", "--max-num-batched-tokens", "64", "--max-num-seqs", "8")
    with ThreadPoolExecutor(2) as pool:
        started = list(pool.map(lambda flag: LiveServer(*common, flag), ["--async-scheduling", "--no-async-scheduling"]))
    yield started
    for server in started:
        assert server.stop() == 0, server.output()


def streamed_answers(server) -> list[tuple[str, str]]:
    """(text, finish reason) of each choice of concurrent greedy streams: n=2, stop strings, long answers."""
    client = sdk_client(server.base_url)
    asks = [dict(content=f"Tell me about {topic}.", n=n, stop=stop, max_tokens=max_tokens)
            for topic, n, stop, max_tokens in [("Paris", 2, None, 48), ("the sea", 1, ["e"], 48), ("cats", 1, [" a", "o"], 64),
                                               ("tea", 3, None, 24), ("numbers", 1, None, 80)]]

    def ask(content: str, n: int, stop, max_tokens: int) -> list[tuple[str, str]]:
        texts, reasons = [""] * n, [""] * n
        for chunk in client.chat.completions.create(model="tiny/llama", messages=[{"role": "user", "content": content}], n=n,
                                                    stop=stop, max_tokens=max_tokens, temperature=0, stream=True):
            for choice in chunk.choices:
                texts[choice.index] += choice.delta.content or ""
                reasons[choice.index] = choice.finish_reason or reasons[choice.index]
        return list(zip(texts, reasons))

    with ThreadPoolExecutor(len(asks)) as pool:
        return [answer for answers in pool.map(lambda a: ask(**a), asks) for answer in answers]


def test_async_serving_streams_the_greedy_text_of_synchronous_serving(servers):
    with_async, without = (streamed_answers(server) for server in servers)
    assert with_async == without
    assert {reason for _, reason in without} == {"stop", "length"}  # the stop strings ended some answers


def test_a_waiting_request_that_cannot_start_holds_no_blocks():
    # Preemptions push requests to the queue's front; had each kept the cached prefix it attached while failing
    # to start, together they could hold every block while none could run (async scheduling's order found it).
    from transerve.engine.step import SampledTokens

    core = EngineCore(SchedulerConfig(max_num_batched_tokens=64), num_kv_blocks=4, block_size=4, max_model_len=64)
    greedy = SamplingParams(max_tokens=4, temperature=0.0)
    a = Request("a", list(range(3, 12)), greedy, seed=0)  # 9 tokens: 3 blocks, the first 2 cached once computed
    core.add_request(a)
    step, _ = core.schedule()
    core.apply(step, SampledTokens({"a": 50}))
    b = Request("b", list(range(3, 11)) + [60, 61, 62, 63, 64], greedy, seed=0)  # a's 2 cached blocks, then 2 more: 1 is free
    core.add_request(b)
    step, scheduled = core.schedule()
    assert scheduled.request_ids == ("a",) and b.block_ids == [] and b.num_computed_tokens == 0
    assert core.block_manager.num_free_blocks == 1
