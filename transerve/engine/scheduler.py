"""Continuous batching: which requests run this step, and how many of their tokens.

Every step has a token budget. Running requests go first (a decode is one token, an unfinished
prefill continues with the next chunk), then waiting requests join while budget, sequence slots and
KV blocks last. When a running request cannot get a block, the most recently admitted running request
is preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed.

Async scheduling (as vLLM's num_output_placeholders): step N+1 may be scheduled before step N is applied.
A request's next chunk then starts after its tokens in flight, and a token that step N samples counts as
one of its tokens before its value is known: the runner appends it and feeds it in. A request runs ahead
only when nothing of step N+1 depends on that value: not when it could be its last token, nor when its
bans or grammar are computed from its tokens here; then it waits one step. In the synchronous loop nothing
is in flight at schedule time, and all of this is the plain policy above.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from transerve.config import SchedulerConfig
from transerve.engine.block_manager import BlockManager
from transerve.engine.request import Request, RequestStatus


class ScheduledRequest(NamedTuple):  # a tuple: hundreds are made per step
    request: Request
    start: int  # the position of the chunk's first token
    num_new_tokens: int
    new_block_ids: tuple[int, ...]  # blocks allocated this step; all of a newly admitted request's blocks
    is_new: bool  # admitted this step (fresh, or resumed after preemption): the runner has no state for it
    samples: bool  # the chunk reaches the end of the request's tokens, so its last logits are sampled


@dataclass(frozen=True)
class Step:
    scheduled: tuple[ScheduledRequest, ...]
    preempted_request_ids: tuple[str, ...]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def num_preempted(self) -> int:
        return len(self.preempted_request_ids)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_model_len: int) -> None:
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Step:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []

        allocate_slots = self.block_manager.allocate_slots
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            request = running[i]
            pending = request.num_pending_tokens
            if pending and not self._may_run_ahead(request, pending):
                i += 1
                continue
            start = request.num_computed_tokens + request.num_in_flight_tokens
            num_tokens = len(request.prompt_token_ids) + len(request.output_token_ids) + pending
            num_new = min(num_tokens - start, budget)
            num_blocks = len(request.block_ids)
            while not allocate_slots(request, num_new):
                victim = running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                new_blocks = tuple(request.block_ids[num_blocks:]) if len(request.block_ids) > num_blocks else ()
                samples = start + num_new == num_tokens
                scheduled.append(ScheduledRequest(request, start, num_new, new_blocks, False, samples))
                request.num_in_flight_tokens += num_new
                request.num_pending_tokens += samples
                budget -= num_new
                i += 1

        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            request = self.waiting[0]
            if request.num_computed_tokens == 0 and not request.block_ids:
                self.block_manager.allocate_cached_prefix(request)
            start = request.num_computed_tokens
            num_new = min(request.num_tokens - start, budget)
            if not self.block_manager.allocate_slots(request, num_new):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            samples = start + num_new == request.num_tokens
            scheduled.append(ScheduledRequest(request, start, num_new, tuple(request.block_ids), True, samples))
            request.num_in_flight_tokens += num_new
            request.num_pending_tokens += samples
            budget -= num_new
        return Step(tuple(scheduled), tuple(preempted))

    def _may_run_ahead(self, request: Request, pending: int) -> bool:
        """Whether a request whose last token is not known yet may run its next step now."""
        params = request.sampling_params
        num_outputs = len(request.output_token_ids) + pending
        return (num_outputs < params.max_tokens and len(request.prompt_token_ids) + num_outputs < self.max_model_len
                and not params.has_bans and request.constraint is None)

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request)
        request.status = RequestStatus.WAITING
        request.num_in_flight_tokens = 0  # its steps in flight still sample: num_pending_tokens stays
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update(self, step: Step, sampled: Mapping[str, int]) -> list[Request]:
        """Apply a finished step: count computed tokens, append sampled tokens, finish requests.

        Returns the requests that produced a token this step, finished or not. A request preempted while
        the step ran (async scheduling) still gets its token, as it would have before its preemption; one
        that finished (a stop, an abort) while the step ran gets nothing."""
        produced = []
        running, waiting = RequestStatus.RUNNING, RequestStatus.WAITING
        cache_full_blocks = self.block_manager.cache_full_blocks if self.block_manager.enable_prefix_caching else None
        for request, _, num_new_tokens, _, _, _ in step.scheduled:
            status = request.status
            if status is running:
                request.num_computed_tokens += num_new_tokens
                request.num_in_flight_tokens -= num_new_tokens
            elif status is not waiting:
                continue  # finished while the step ran
            token_id = sampled.get(request.request_id)
            if token_id is not None:
                request.num_pending_tokens -= 1
                request.output_token_ids.append(token_id)
                produced.append(request)
                status = self._stop_status(request, token_id)
                if status is not None:
                    self.finish(request, status)
                    continue
            if cache_full_blocks is not None and request.status is running:
                cache_full_blocks(request)
        return produced

    def _stop_status(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in request.eos_token_ids):
            return RequestStatus.FINISHED_STOPPED
        num_output_tokens = len(request.output_token_ids)
        if num_output_tokens >= params.max_tokens or len(request.prompt_token_ids) + num_output_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Finish a request in any state (also used for aborts); its blocks are free at once."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        request.status = status
        self.block_manager.free(request)
