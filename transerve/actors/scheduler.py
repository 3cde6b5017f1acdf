"""Scheduler actor: owns the engine loop. Admit, schedule a step, run it on the executor, apply it.

With async scheduling (the default) the next step is scheduled and queued at the executor before the
running one's result is applied, so the model runs back to back while this loop applies results,
streams their tokens and schedules the step after (engine/scheduler.py says how requests run ahead)."""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from transerve.actors.messages import (
    Abort, ExecuteStep, NewToken, RequestFailed, StepOutput, StepResult, TokenizedRequest,
)
from transerve.engine.core import EngineCore, TokenOutput
from transerve.engine.request import Request
from transerve.engine.scheduler import Step
from transerve.engine.stats import SchedulerStats
from transerve.engine.step import SampledLogprobs

log = logging.getLogger(__name__)


def _new_token(out: TokenOutput, logprobs: SampledLogprobs | None = None) -> NewToken:
    reason = out.status.value if out.status.is_finished else None
    return NewToken(out.request_id, out.token_id, reason, out.num_prompt_tokens, out.num_cached_tokens, logprobs)


class SchedulerActor:
    def __init__(
        self,
        core: EngineCore,
        eos_token_ids: frozenset[int],
        inbox: ObjectReceiveStream[TokenizedRequest | Abort],
        to_executor: ObjectSendStream[ExecuteStep],
        from_executor: ObjectReceiveStream[StepResult],
        to_detokenizer: ObjectSendStream[StepOutput | RequestFailed],
        publish_stats: Callable[[SchedulerStats], None] = lambda stats: None,
    ) -> None:
        self.core = core
        self.eos_token_ids = eos_token_ids
        self.inbox = inbox
        self.to_executor = to_executor
        self.from_executor = from_executor
        self.to_detokenizer = to_detokenizer
        self.closing = False
        self.publish_stats = publish_stats  # the engine's state for /metrics, after each step and message
        # Steps sent to the executor whose results are not applied yet, oldest first; at most this many.
        self.in_flight: deque[Step] = deque()
        self.max_in_flight = 2 if core.scheduler.config.async_scheduling else 1
        publish_stats(core.stats())

    async def run(self) -> None:
        async with self.inbox, self.to_executor, self.from_executor, self.to_detokenizer:
            while not (self.closing and not self.core.has_work() and not self.in_flight):
                if not self.core.has_work() and not self.in_flight:
                    try:
                        await self.handle(await self.inbox.receive())
                    except anyio.EndOfStream:
                        return
                await self.drain_inbox()
                sent = len(self.in_flight) < self.max_in_flight and self.core.has_work() and await self.send_step()
                if self.in_flight and (not sent or len(self.in_flight) == self.max_in_flight):
                    await self.apply_result()
                elif sent:
                    continue  # async: schedule the next step before this one's result
                else:
                    # Nothing fits now (preempted requests resume next step). Yield to the event loop so a
                    # scheduler that cannot progress never starves HTTP and the other actors.
                    await anyio.sleep(0)
                self.publish_stats(self.core.stats())

    async def drain_inbox(self) -> None:
        while not self.closing:
            try:
                message = self.inbox.receive_nowait()
            except anyio.WouldBlock:
                return
            except anyio.EndOfStream:
                self.closing = True  # finish what was accepted, then stop
                return
            await self.handle(message)

    async def handle(self, message: TokenizedRequest | Abort) -> None:
        if isinstance(message, Abort):
            out = self.core.abort(message.request_id)
            if out is not None:
                await self.to_detokenizer.send(StepOutput((_new_token(out),)))
            return
        params = message.sampling_params
        request = Request(
            request_id=message.request_id,
            prompt_token_ids=list(message.prompt_token_ids),
            sampling_params=params,
            seed=params.seed if params.seed is not None else random.getrandbits(62),
            eos_token_ids=self.eos_token_ids,
            multimodal=message.multimodal,
            constraint=message.constraint,
        )
        if not self.core.add_request(request):
            await self.to_detokenizer.send(RequestFailed(
                request.request_id, "the prompt needs more KV cache than this server has; raise --num-kv-blocks", 400, "messages"
            ))

    async def send_step(self) -> bool:
        """Schedule a step and queue it at the executor; False if no request could run."""
        step, scheduled = self.core.schedule()
        if not scheduled.num_requests:
            return False
        await self.to_executor.send(ExecuteStep(scheduled))
        self.in_flight.append(step)
        return True

    async def apply_result(self) -> None:
        """Wait for the oldest step in flight, apply its result and send its tokens on."""
        step = self.in_flight.popleft()
        result = await self.from_executor.receive()
        if result.error is not None:
            outputs = self.core.fail(step)
            for out in outputs:
                await self.to_detokenizer.send(RequestFailed(out.request_id, f"model step failed: {result.error}", 500))
            return
        outputs = self.core.apply(step, result.sampled)
        if outputs:
            logprobs = result.sampled.logprobs
            await self.to_detokenizer.send(StepOutput(tuple(_new_token(out, logprobs.get(out.request_id)) for out in outputs)))
