"""One engine replica: a whole transerve engine (its actors, model and KV cache) inside a Ray Serve
replica, reached by the ingress through a deployment handle. What crosses is what crosses the actors'
mailboxes today: GenerateRequests in, RequestEvents out, all frozen dataclasses."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import ray
from ray import serve

from transerve.actors.client import EngineClient, GenerateRequest
from transerve.actors.messages import RequestEvent
from transerve.actors.registry import Models
from transerve.cluster.lifetime import Lifetime
from transerve.config import EngineConfig
from transerve.engine.stats import SchedulerStats


@dataclass(frozen=True)
class EngineInfo:
    """What the HTTP layer reads off an engine client besides generate(): the same on every replica."""

    model_id: str
    max_model_len: int
    vocab_size: int
    generation_defaults: dict[str, Any]
    accepts_images: bool
    tokenizer: Any  # for echoing token-id prompts; HF tokenizers pickle


@dataclass(frozen=True)
class ReplicaStats:
    """One replica's state, polled by the ingress for /metrics, /health and /v1/models."""

    replica: str  # Serve's replica id; a restarted replica gets a new one
    pid: int
    node: str
    scheduler: SchedulerStats
    num_in_flight: int
    requests: int  # engine requests ended, however they ended
    prompt_tokens: int
    cached_prompt_tokens: int  # prompt tokens served from the prefix cache
    generation_tokens: int


class EngineReplica:
    async def __init__(self, spec: str, config: EngineConfig, mailbox_size: int) -> None:
        self.spec, self.config, self.mailbox_size = spec, config, mailbox_size
        self.lifetime: Lifetime[Models] = Lifetime()
        self.models = await self.lifetime.start(self._start_engine, self._stop_engine)

    async def _start_engine(self, task_group) -> Models:
        models = Models(self.config, task_group, self.mailbox_size, forced=self.spec, allow_download=True)
        engine = await models.get(self.spec)
        if not isinstance(engine, EngineClient):
            raise ValueError(f"{self.spec} is not a text model; `transerve cluster` serves text models")
        return models

    async def _stop_engine(self, models: Models) -> None:
        await models.aclose()

    async def _engine(self) -> EngineClient:
        return await self.models.get(self.spec)  # loads the model again if its engine crashed

    async def describe(self) -> EngineInfo:
        e = await self._engine()
        return EngineInfo(e.model_id, e.max_model_len, e.vocab_size, e.generation_defaults, e.accepts_images,
                          e.tokenizer)

    async def generate(self, requests: list[GenerateRequest]) -> AsyncIterator[RequestEvent]:
        # Serve cancels this generator when the ingress stops reading (its client left); leaving
        # EngineClient.generate aborts the requests in the engine.
        async for event in (await self._engine()).generate(requests):
            yield event

    async def stats(self) -> ReplicaStats:
        engine = self.models.engines.get(self.spec)
        totals: dict[str, float] = {}
        for family in self.models.metrics.registry.collect():  # counters: sum over their other labels
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("model") == self.spec:
                    totals[family.name] = totals.get(family.name, 0) + sample.value
        return ReplicaStats(
            serve.get_replica_context().replica_id.unique_id, os.getpid(), ray.util.get_node_ip_address(),
            engine.stats if engine is not None else SchedulerStats(), engine.num_in_flight if engine is not None else 0,
            *(int(totals.get(f"transerve_{name}", 0)) for name in
              ("requests_finished", "prompt_tokens", "prompt_tokens_cached", "generation_tokens")),
        )

    async def check_health(self) -> None:
        """Serve calls this periodically; raising makes it replace the replica."""
        if not self.lifetime.running or self.spec not in self.models.engines:
            raise RuntimeError(f"the engine of {self.spec} stopped")

    async def __del__(self) -> None:
        await self.lifetime.stop()
