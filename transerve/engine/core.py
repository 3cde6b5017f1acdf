"""The engine core: requests in, steps out, results applied. Synchronous; the actors wrap it.

`generate()` at the bottom drives it with a model runner in a plain loop, for tests and the offline
benchmark; the server drives the same two calls from the scheduler and executor actors.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Iterator
from typing import NamedTuple

from transerve.config import SchedulerConfig
from transerve.engine.block_manager import BlockManager
from transerve.engine.grammar import Matcher, fill_bitmask
from transerve.engine.request import ContextLengthError, Request, RequestStatus, banned_token_ids, fit_max_tokens
from transerve.engine.scheduler import Scheduler, Step, _new
from transerve.engine.stats import SchedulerStats
from transerve.engine.step import NewRequest, SampledTokens, ScheduledStep


class TokenOutput(NamedTuple):  # a tuple: one per token
    request_id: str
    token_id: int | None  # None when the request finished without a new token (aborted, failed)
    status: RequestStatus
    num_prompt_tokens: int
    num_cached_tokens: int


class EngineCore:
    def __init__(self, config: SchedulerConfig, num_kv_blocks: int, block_size: int, max_model_len: int,
                 enable_prefix_caching: bool = True) -> None:
        self.block_manager = BlockManager(num_kv_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager, max_model_len)
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}
        self.num_failed_steps = 0  # steps whose model call raised; read by /metrics
        self.freed_request_ids: list[str] = []  # for the next step that runs: the runner drops their state
        self.matchers: dict[str, Matcher] = {}  # constrained requests: where each output stands in its grammar

    def add_request(self, request: Request) -> bool:
        """Queue a request, its max_tokens resolved by `fit_max_tokens` (the server's tokenizer has done so
        already, to name the error); False if it cannot fit even alone."""
        try:
            request.sampling_params = fit_max_tokens(request.sampling_params, request.num_prompt_tokens, self.max_model_len,
                                                     self.kv_capacity)
        except ContextLengthError:
            return False
        self.requests[request.request_id] = request
        if request.constraint is not None:
            params = request.sampling_params
            stops = params.stop_token_ids if params.ignore_eos else request.eos_token_ids | set(params.stop_token_ids)
            self.matchers[request.request_id] = Matcher(request.constraint, stops)
        self.scheduler.add(request)
        return True

    @property
    def kv_capacity(self) -> int:
        """Tokens the whole KV cache holds."""
        return self.block_manager.num_blocks * self.block_manager.block_size

    def abort(self, request_id: str) -> TokenOutput | None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        self.matchers.pop(request_id, None)
        self.freed_request_ids.append(request_id)
        return self._output(request, None)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def schedule(self) -> tuple[Step, ScheduledStep]:
        """The next step, and what the model runner needs of it (engine/step.py): the data of requests it
        has not seen, deltas for the others. A step with no requests is not for the runner."""
        step = self.scheduler.schedule()
        self.freed_request_ids.extend(step.preempted_request_ids)
        if not step.scheduled:
            return step, EMPTY_STEP
        # Column by column (C-level getters): this runs for every request in every step.
        requests, starts, num_new_tokens, new_block_ids, is_new, samples = zip(*step.scheduled)
        new_requests = tuple(NewRequest(r.request_id, tuple(r.prompt_token_ids), tuple(r.output_token_ids), r.sampling_params,
                                        r.seed, r.multimodal) for r, new in zip(requests, is_new) if new) if any(is_new) else ()
        bans = ((),) * len(requests)
        if any(map(_has_bans, requests)):
            bans = tuple(banned_token_ids(r) if sample and r.sampling_params.has_bans else () for r, sample in zip(requests, samples))
        mask_rows, matchers = [], []
        if self.matchers:
            for i, (request, sample) in enumerate(zip(requests, samples)):
                if sample and (matcher := self.matchers.get(request.request_id)) is not None and matcher.active:
                    mask_rows.append(i)
                    matchers.append(matcher)
        freed, self.freed_request_ids = tuple(self.freed_request_ids), []
        return step, ScheduledStep(new_requests, tuple(map(_request_id, requests)), starts, num_new_tokens, new_block_ids, samples, bans, freed, fill_bitmask(mask_rows, matchers))

    def apply(self, step: Step, sampled: SampledTokens) -> list[TokenOutput]:
        """Apply a step's sampled tokens; one output per new token, finished requests removed."""
        outputs = []
        add = outputs.append
        matchers = self.matchers
        for request in self.scheduler.update(step, sampled.token_ids):
            token_id = request.output_token_ids[-1]
            request_id = request.request_id
            status = request.status
            add(_new(TokenOutput, (request_id, token_id, status, len(request.prompt_token_ids), request.num_cached_tokens)))
            if matchers and (matcher := matchers.get(request_id)) is not None:
                matcher.accept(token_id)
            if status.is_finished:
                del self.requests[request_id]
                matchers.pop(request_id, None)
                self.freed_request_ids.append(request_id)
        return outputs

    def fail(self, step: Step) -> list[TokenOutput]:
        """The step could not run: finish every request in it."""
        self.num_failed_steps += 1
        return [out for item in step.scheduled if (out := self.abort(item.request.request_id)) is not None]

    def _output(self, request: Request, token_id: int | None) -> TokenOutput:
        return TokenOutput(request.request_id, token_id, request.status, request.num_prompt_tokens, request.num_cached_tokens)

    def stats(self) -> SchedulerStats:
        blocks = self.block_manager
        return SchedulerStats(len(self.scheduler.waiting), len(self.scheduler.running),
                              blocks.num_blocks - blocks.num_free_blocks, blocks.num_free_blocks,
                              self.scheduler.num_preemptions, self.num_failed_steps)


EMPTY_STEP = ScheduledStep((), (), (), (), (), (), ())
_request_id = operator.attrgetter("request_id")
_has_bans = operator.attrgetter("sampling_params.has_bans")


def generate(core: EngineCore, runner, requests: list[Request], pipelined: bool | None = None) -> dict[str, list[int]]:
    """Run requests to completion in one process, without actors; returns output ids by request."""
    outputs: dict[str, list[int]] = {r.request_id: [] for r in requests}
    for request in requests:
        if not core.add_request(request):
            raise ValueError(f"request {request.request_id} does not fit in the KV cache")
    for step_outputs in run_steps(core, runner, pipelined):
        for out in step_outputs:
            outputs[out.request_id].append(out.token_id)
    return outputs


def run_steps(core: EngineCore, runner, pipelined: bool | None = None) -> Iterator[list[TokenOutput]]:
    """Run steps until the core has no work, yielding each applied step's outputs (the caller may add and abort
    requests in between). `pipelined` (default: the config's async_scheduling) schedules step N+1 before step
    N is applied, in the order the scheduler actor does: the same tokens, one step run ahead."""
    if pipelined is None:
        pipelined = core.scheduler.config.async_scheduling
    depth = 2 if pipelined else 1
    in_flight: deque[tuple[Step, SampledTokens]] = deque()
    while core.has_work() or in_flight:
        sent = False
        if len(in_flight) < depth and core.has_work():
            step, scheduled = core.schedule()
            if sent := scheduled.num_requests > 0:
                in_flight.append((step, runner.execute(scheduled)))
        if in_flight and (len(in_flight) == depth or not sent):
            yield core.apply(*in_flight.popleft())
        elif not sent:
            raise RuntimeError("no request fits in the KV cache")
