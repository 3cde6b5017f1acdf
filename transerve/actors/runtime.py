"""Builds the bounded mailboxes, starts the four actors of a model, and gives handlers one client.

`EngineClient.generate(...)` is all the HTTP layer sees of an engine: an async iterator of
`TextDelta`s (or one `RequestError`). Leaving the iterator early, for any reason, aborts the request.
`Models` loads engines by name on first use, once even when many requests ask at the same time.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from anyio.abc import ObjectSendStream, TaskGroup

from transerve.actors.detokenizer import detokenizer_actor
from transerve.actors.executor import executor_actor
from transerve.actors.messages import Abort, RequestEvent, TokenizeRequest
from transerve.actors.scheduler import SchedulerActor
from transerve.actors.tokenizer import tokenizer_actor
from transerve.config import EngineConfig
from transerve.engine import models
from transerve.engine.core import EngineCore
from transerve.engine.model_runner import ModelRunner, choose_num_kv_blocks, load_model, resolve_device, resolve_dtype
from transerve.engine.request import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """Everything an engine needs, loaded in a worker thread before the actors start."""

    model_id: str
    tokenizer: Any
    runner: ModelRunner
    core: EngineCore
    eos_token_ids: frozenset[int]
    generation_defaults: dict[str, Any]
    max_model_len: int


def load(spec: str, config: EngineConfig, allow_download: bool) -> LoadedModel:
    resolved = models.resolve(spec, allow_download=allow_download)
    path = models.materialize(resolved, config.trust_remote_code)
    tokenizer = models.load_tokenizer(resolved, config.trust_remote_code)
    generation_config = models.load_generation_config(resolved)
    device = resolve_device(config.device)
    model = load_model(path, config, device, resolve_dtype(config.dtype, device))
    text_config = model.config.get_text_config()
    max_model_len = getattr(text_config, "max_position_embeddings", None) or 4096
    if config.scheduler.max_model_len is not None:
        max_model_len = min(max_model_len, config.scheduler.max_model_len)
    num_kv_blocks = choose_num_kv_blocks(model, config, max_model_len)
    runner = ModelRunner(model, config, num_kv_blocks, max_model_len)
    core = EngineCore(config.scheduler, num_kv_blocks, config.cache.block_size, max_model_len, config.cache.enable_prefix_caching)
    eos = generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    defaults = {k: getattr(generation_config, k) for k in ("temperature", "top_p", "top_k", "min_p")}
    if not generation_config.do_sample:
        defaults = {}  # the model's config says nothing about sampling: the OpenAI defaults apply
    log.info("loaded %s on %s: %d KV blocks of %d tokens, context %d", spec, device, num_kv_blocks,
             config.cache.block_size, max_model_len)
    return LoadedModel(spec, tokenizer, runner, core, frozenset(eos_ids), defaults, max_model_len)


class EngineClient:
    def __init__(self, loaded: LoadedModel, tokenizer_inbox: ObjectSendStream) -> None:
        self.model_id = loaded.model_id
        self.max_model_len = loaded.max_model_len
        self.generation_defaults = loaded.generation_defaults
        self.created = int(time.time())
        self.loaded = loaded
        self._tokenizer_inbox = tokenizer_inbox

    async def aclose(self) -> None:
        await self._tokenizer_inbox.aclose()

    async def generate(
        self,
        sampling_params: SamplingParams,
        *,
        max_tokens_given: bool,
        messages: list[dict] | None = None,
        prompt: str | None = None,
        stop: tuple[str, ...] = (),
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> AsyncIterator[RequestEvent]:
        request_id = uuid.uuid4().hex
        # One slot per possible token plus the final event: the detokenizer never waits on a client.
        size = min(sampling_params.max_tokens, self.max_model_len) + 2
        sink, source = anyio.create_memory_object_stream[RequestEvent](size)
        request = TokenizeRequest(
            request_id, sampling_params, stop, sink,
            messages=tuple(messages) if messages is not None else None, prompt=prompt,
            chat_template_kwargs=tuple((chat_template_kwargs or {}).items()),
        )
        try:
            await self._tokenizer_inbox.send((request, max_tokens_given))
            async with source:
                async for event in source:
                    yield event
        finally:
            # Whatever ended the iteration (the client left, a stop string matched, an error), the
            # engine must drop the request now; for one it already finished this is a no-op.
            with anyio.CancelScope(shield=True):
                try:
                    await self._tokenizer_inbox.send(Abort(request_id))
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    pass


async def start_engine(task_group: TaskGroup, loaded: LoadedModel, mailbox_size: int) -> EngineClient:
    tok_send, tok_recv = anyio.create_memory_object_stream(mailbox_size)
    sched_send, sched_recv = anyio.create_memory_object_stream(mailbox_size)
    exec_send, exec_recv = anyio.create_memory_object_stream(1)
    result_send, result_recv = anyio.create_memory_object_stream(1)
    detok_send, detok_recv = anyio.create_memory_object_stream(mailbox_size)
    scheduler = SchedulerActor(loaded.core, loaded.eos_token_ids, sched_recv, exec_send, result_recv, detok_send.clone())
    task_group.start_soon(tokenizer_actor, loaded.tokenizer, loaded.max_model_len, tok_recv, detok_send, sched_send)
    task_group.start_soon(scheduler.run)
    task_group.start_soon(executor_actor, loaded.runner, exec_recv, result_send)
    task_group.start_soon(detokenizer_actor, loaded.tokenizer, detok_recv)
    return EngineClient(loaded, tok_send)


@dataclass
class Models:
    """The engines of this server: one pinned model, or any model loaded by name on first use."""

    config: EngineConfig
    task_group: TaskGroup
    mailbox_size: int = 1024
    forced: str | None = None
    allow_download: bool = False
    engines: dict[str, EngineClient] = field(default_factory=dict)
    _locks: dict[str, anyio.Lock] = field(default_factory=dict)

    async def aclose(self) -> None:
        """Stop taking requests; each engine's actors finish what they hold and return."""
        for engine in self.engines.values():
            await engine.aclose()

    async def get(self, name: str | None) -> EngineClient:
        """The engine serving `name`; raises models.ModelNotFoundError."""
        spec = self.forced or name
        if not spec:
            raise models.ModelNotFoundError("no model given; pass `model` in the request")
        if spec in self.engines:
            return self.engines[spec]
        lock = self._locks.setdefault(spec, anyio.Lock())
        async with lock:
            if spec not in self.engines:
                allow_download = self.allow_download and spec == self.forced
                loaded = await anyio.to_thread.run_sync(load, spec, self.config, allow_download)
                self.engines[spec] = await start_engine(self.task_group, loaded, self.mailbox_size)
        return self.engines[spec]
