"""The one object the HTTP layer sees of a text engine: `generate(...)`, and `stats` for /metrics.

`EngineClient.generate(requests)` runs one HTTP request's choices (n samples, or a list of prompts)
and yields their `TextDelta`s as they come, interleaved and tagged with `index`, or `RequestError`s.
Leaving the iterator early, for any reason, aborts every choice still running. `stats` is the
engine's state as the scheduler actor last published it.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import ObjectSendStream

from transerve.actors.admission import Admission
from transerve.actors.assembly import LoadedModel
from transerve.actors.delta_stream import DeltaStream
from transerve.actors.messages import Abort, OutputOptions, RequestError, RequestEvent, TokenizeRequest
from transerve.actors.metrics import EngineMetrics
from transerve.actors.tokenizer import build_prompt
from transerve.engine.request import SamplingParams
from transerve.engine.stats import SchedulerStats


@dataclass(frozen=True)
class GenerateRequest:
    """One choice: a prompt (chat messages, text or token ids) and how to sample and parse its answer."""

    sampling_params: SamplingParams  # max_tokens None: as many as fit (engine.request.fit_max_tokens)
    messages: tuple[dict[str, Any], ...] | None = None
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None
    stop: tuple[str, ...] = ()
    chat_template_kwargs: tuple[tuple[str, Any], ...] = ()
    tools: tuple[dict[str, Any], ...] | None = None
    output: OutputOptions = OutputOptions()
    images: tuple[Any, ...] = ()  # decoded images for the messages' image parts


class EngineClient:
    def __init__(self, loaded: LoadedModel, tokenizer_inbox: ObjectSendStream, metrics: EngineMetrics | None = None) -> None:
        self.model_id = loaded.model_id
        self.max_model_len = loaded.max_model_len
        self.vocab_size = loaded.vocab_size
        self.generation_defaults = loaded.generation_defaults
        self.precision = loaded.precision
        self.tokenizer = loaded.tokenizer  # for the HTTP layer's own small needs (echo of token prompts)
        self.accepts_images = loaded.image_prompts is not None
        self._image_prompts = loaded.image_prompts
        self.created = int(time.time())
        self.stats = SchedulerStats()  # replaced by the scheduler actor's first publication before any request
        self.in_flight = 0  # HTTP requests inside generate(); an engine with some is never unloaded
        self.last_used = anyio.current_time()
        self.closed = anyio.Event()
        self._tokenizer_inbox = tokenizer_inbox
        self.metrics = metrics if metrics is not None else EngineMetrics()
        self.admission = Admission(loaded.model_id, loaded.core.scheduler.config, self.metrics)

    def touch(self) -> None:
        self.last_used = anyio.current_time()

    def update_stats(self, stats: SchedulerStats) -> None:
        """Called by the scheduler actor after each step (on the event loop, like every reader)."""
        self.stats = stats

    @property
    def num_in_flight(self) -> int:
        """Engine requests admitted and not yet ended, the number --max-queued-requests bounds."""
        return self.admission.num_in_flight

    async def aclose(self) -> None:
        """Take no more requests; the actors finish what they hold and return."""
        self.closed.set()
        await self._tokenizer_inbox.aclose()

    async def count_prompt_tokens(self, request: GenerateRequest) -> int:
        """The prompt's length in tokens, built exactly as `generate` builds it (template, tools, images);
        raises PromptError for a prompt the model cannot take."""
        ids, _, _ = await build_prompt(self.tokenizer, _tokenize_request("count", request, None), self._image_prompts)
        return len(ids)

    async def generate(self, requests: Sequence[GenerateRequest]) -> AsyncIterator[RequestEvent]:
        request_ids = [uuid.uuid4().hex for _ in requests]
        # One slot per possible token plus the final event, per choice: the detokenizer never waits on a client
        # (a lagging client's deltas are merged, so the stream rarely holds more than one per choice).
        size = sum(min(r.sampling_params.max_tokens or self.max_model_len, self.max_model_len) + 2 for r in requests)
        self.admission.enter(len(requests))  # raises EngineOverloadedError (429) when the queue is full
        events = DeltaStream(size)
        trackers = self.metrics.track(self.model_id, len(requests))
        self.in_flight += 1
        try:
            try:
                # Every choice's send end exists before the first is sent, so an early finish cannot end the stream.
                senders = [events.sender() for _ in requests]
                for index, (request_id, r, sender) in enumerate(zip(request_ids, requests, senders)):
                    await self._tokenizer_inbox.send(_tokenize_request(request_id, r, sender, index))
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                trackers.fail()
                yield RequestError("this model was just unloaded; send the request again", 503)
                return
            while True:
                try:
                    event = await events.receive()  # what waits is taken without a trip through the event loop
                except anyio.EndOfStream:
                    break
                trackers.on_event(event)
                yield event
        finally:
            events.close()
            self.in_flight -= 1
            self.admission.leave(len(requests))
            trackers.finish()
            self.touch()
            # Whatever ended the iteration (the client left, a stop string matched, an error), the
            # engine must drop the requests now; for finished ones this is a no-op.
            with anyio.CancelScope(shield=True):
                for request_id in request_ids:
                    try:
                        await self._tokenizer_inbox.send(Abort(request_id))
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        break


def _tokenize_request(request_id: str, r: GenerateRequest, sink: ObjectSendStream | None, index: int = 0) -> TokenizeRequest:
    return TokenizeRequest(request_id, r.sampling_params, r.stop, sink, messages=r.messages, prompt=r.prompt,
                           chat_template_kwargs=r.chat_template_kwargs, index=index, prompt_token_ids=r.prompt_token_ids,
                           tools=r.tools, output=r.output, images=r.images)
