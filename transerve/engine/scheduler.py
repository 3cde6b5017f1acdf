"""Continuous batching: which requests run this step, and how many of their tokens.

Every step has a token budget. Running requests go first (a decode is one token, an unfinished
prefill continues with the next chunk), then waiting requests join while budget, sequence slots and
KV blocks last. When a running request cannot get a block, the most recently admitted running request
is preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from transerve.config import SchedulerConfig
from transerve.engine.block_manager import BlockManager
from transerve.engine.request import Request, RequestStatus


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    new_block_ids: tuple[int, ...]  # blocks allocated this step; all of a newly admitted request's blocks
    is_new: bool  # admitted this step (fresh, or resumed after preemption): the runner has no state for it

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the request's tokens, so its last logits are sampled."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


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

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            num_blocks = len(request.block_ids)
            while not self.block_manager.allocate_slots(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                scheduled.append(ScheduledRequest(request, num_new, tuple(request.block_ids[num_blocks:]), False))
                budget -= num_new
                i += 1

        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            request = self.waiting[0]
            if request.num_computed_tokens == 0 and not request.block_ids:
                self.block_manager.allocate_cached_prefix(request)
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self.block_manager.allocate_slots(request, num_new):
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(ScheduledRequest(request, num_new, tuple(request.block_ids), True))
            budget -= num_new
        return Step(tuple(scheduled), tuple(preempted))

    def _preempt(self, request: Request) -> None:
        self.block_manager.free(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def update(self, step: Step, sampled: Mapping[str, int]) -> list[Request]:
        """Apply a finished step: count computed tokens, append sampled tokens, finish requests.

        Returns the requests that produced a token this step, finished or not."""
        produced = []
        for item in step.scheduled:
            request = item.request
            if request.status is not RequestStatus.RUNNING:
                continue  # aborted while the step ran
            request.num_computed_tokens += item.num_new_tokens
            token_id = sampled.get(request.request_id)
            if token_id is not None:
                request.output_token_ids.append(token_id)
                produced.append(request)
                status = self._stop_status(request, token_id)
                if status is not None:
                    self.finish(request, status)
                    continue
            self.block_manager.cache_full_blocks(request)
        return produced

    def _stop_status(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in request.eos_token_ids):
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= params.max_tokens or request.num_tokens >= self.max_model_len:
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
