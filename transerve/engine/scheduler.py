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


_new = tuple.__new__  # builds a NamedTuple in C (its own __new__ is a Python function): once per request per step


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
        params = request.sampling_params
        request.stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else request.eos_token_ids)
        request.max_num_tokens = min(request.num_prompt_tokens + (params.max_tokens or self.max_model_len), self.max_model_len)
        request.needs_known_tokens = params.has_bans or request.constraint is not None
        self.waiting.append(request)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Step:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []

        # Running requests: hundreds per step, so plain attribute arithmetic, no calls for a decode that fits.
        add = scheduled.append
        block_size = self.block_manager.block_size
        running = self.running
        i = 0
        while i < len(running) and budget > 0:
            request = running[i]
            pending = request.num_pending_tokens
            num_tokens = len(request.prompt_token_ids) + len(request.output_token_ids) + pending
            # A token not known yet (async scheduling) that could be the last, or that the next step's bans
            # or grammar mask depend on: wait for it.
            if pending and (num_tokens >= request.max_num_tokens or request.needs_known_tokens):
                i += 1
                continue
            start = request.num_computed_tokens + request.num_in_flight_tokens
            remaining = num_tokens - start
            num_new = remaining if remaining <= budget else budget
            block_ids = request.block_ids
            if start + num_new <= len(block_ids) * block_size:  # the last block has room: most decodes
                new_blocks = ()
            else:
                num_blocks = len(block_ids)
                if not self._allocate_or_preempt(request, num_new, preempted):
                    continue  # the request itself was preempted
                new_blocks = tuple(block_ids[num_blocks:])
            samples = num_new == remaining
            add(_new(ScheduledRequest, (request, start, num_new, new_blocks, False, samples)))
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
                # No waiting request holds blocks: the cached prefix just attached (still cached) goes back,
                # or requests pushed to the front by preemption would each hold theirs until none could run.
                self.block_manager.free(request)
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

    def _allocate_or_preempt(self, request: Request, num_new: int, preempted: list[str]) -> bool:
        """Blocks for a running request's chunk, preempting the most recently admitted running requests until
        they fit; False if that preempted the request itself."""
        while not self.block_manager.allocate_slots(request, num_new):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is request:
                return False
        return True

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
        add = produced.append
        get = sampled.get
        running, waiting = RequestStatus.RUNNING, RequestStatus.WAITING
        cache_full_blocks = self.block_manager.cache_full_blocks if self.block_manager.enable_prefix_caching else None
        block_size = self.block_manager.block_size
        for request, _, num_new_tokens, _, _, _ in step.scheduled:
            status = request.status
            if status is running:
                request.num_computed_tokens += num_new_tokens
                request.num_in_flight_tokens -= num_new_tokens
            elif status is not waiting:
                continue  # finished while the step ran
            token_id = get(request.request_id)
            if token_id is not None:
                request.num_pending_tokens -= 1
                outputs = request.output_token_ids
                outputs.append(token_id)
                add(request)
                if token_id in request.stop_ids:
                    self.finish(request, RequestStatus.FINISHED_STOPPED)
                    continue
                if len(request.prompt_token_ids) + len(outputs) >= request.max_num_tokens:
                    self.finish(request, RequestStatus.FINISHED_LENGTH)
                    continue
            # A preempted request has no blocks and nothing computed, so this is False for it.
            if cache_full_blocks is not None and request.num_computed_tokens // block_size > len(request.block_hashes):
                cache_full_blocks(request)
        return produced

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Finish a request in any state (also used for aborts); its blocks are free at once."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        request.status = status
        self.block_manager.free(request)
