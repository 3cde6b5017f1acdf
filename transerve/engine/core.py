"""The engine core: requests in, steps out, results applied. Synchronous; the actors wrap it.

`generate()` at the bottom drives it with a model runner in a plain loop, for tests and the offline
benchmark; the server drives the same two calls from the scheduler and executor actors.
"""

from __future__ import annotations

from dataclasses import dataclass

from transerve.config import SchedulerConfig
from transerve.engine.block_manager import BlockManager
from transerve.engine.model_runner import SequenceInput
from transerve.engine.request import ContextLengthError, Request, RequestStatus, fit_max_tokens
from transerve.engine.sampling import banned_token_ids
from transerve.engine.scheduler import Scheduler, Step
from transerve.engine.stats import SchedulerStats


@dataclass(frozen=True)
class TokenOutput:
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

    def add_request(self, request: Request) -> bool:
        """Queue a request, its max_tokens resolved by `fit_max_tokens` (the server's tokenizer has done so
        already, to name the error); False if it cannot fit even alone."""
        try:
            request.sampling_params = fit_max_tokens(request.sampling_params, request.num_prompt_tokens, self.max_model_len,
                                                     self.kv_capacity)
        except ContextLengthError:
            return False
        self.requests[request.request_id] = request
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
        return self._output(request, None)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def schedule(self) -> tuple[Step, tuple[SequenceInput, ...]]:
        step = self.scheduler.schedule()
        inputs = []
        for item in step.scheduled:
            request = item.request
            start = request.num_computed_tokens
            params = request.sampling_params
            inputs.append(SequenceInput(
                request_id=request.request_id,
                token_ids=tuple(request.token_ids(start, start + item.num_new_tokens)),
                start_position=start,
                block_ids=tuple(request.block_ids),
                sample=item.samples,
                temperature=params.temperature,
                top_p=params.top_p,
                top_k=params.top_k,
                min_p=params.min_p,
                seed=request.seed,
                output_index=request.num_output_tokens,
                multimodal=request.multimodal,
                **(_sampling_extras(request) if item.samples else {}),
            ))
        return step, tuple(inputs)

    def apply(self, step: Step, sampled: dict[str, int]) -> list[TokenOutput]:
        """Apply a step's sampled tokens; one output per new token, finished requests removed."""
        outputs = []
        for request in self.scheduler.update(step, sampled):
            outputs.append(self._output(request, request.output_token_ids[-1]))
            if request.status.is_finished:
                del self.requests[request.request_id]
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


def _sampling_extras(request: Request) -> dict:
    """The SequenceInput fields beyond the basic sampling knobs, only those the request uses."""
    params = request.sampling_params
    extras: dict = {}
    if params.logit_bias:
        extras["logit_bias"] = params.logit_bias
    if params.has_bans:
        extras["banned_token_ids"] = banned_token_ids(request)
    if params.has_penalties:
        extras.update(
            repetition_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty, prompt_token_ids=tuple(request.prompt_token_ids),
            output_token_ids=tuple(request.output_token_ids),
        )
    if params.num_logprobs is not None:
        extras["num_logprobs"] = params.num_logprobs
    return extras


def generate(core: EngineCore, runner, requests: list[Request]) -> dict[str, list[int]]:
    """Run requests to completion in one process, without actors; returns output ids by request."""
    outputs: dict[str, list[int]] = {r.request_id: [] for r in requests}
    for request in requests:
        if not core.add_request(request):
            raise ValueError(f"request {request.request_id} does not fit in the KV cache")
    while core.has_work():
        step, inputs = core.schedule()
        if not inputs:
            raise RuntimeError("no request fits in the KV cache")
        for out in core.apply(step, runner.execute(inputs)):
            outputs[out.request_id].append(out.token_id)
    return outputs
