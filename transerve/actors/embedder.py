"""The embedder actor: every embedding request waiting when a batch starts shares its forward passes.

An embedding model gets this actor instead of the paged text engine's four (no KV cache: each input
is one whole forward row). Its client (embedding_client.py) tokenizes a request's inputs and sends
them here as one job; the actor takes the first job, drains whatever else waits (up to the model's
tokens per batch), runs them together in a worker thread (`engine.embedding.embed` sorts the rows by
length into forward passes) and answers each job on its own stream. A client that left is skipped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anyio
import numpy as np
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from transerve.actors.metrics import EngineMetrics
from transerve.actors.transcriber import offer, serve_batches
from transerve.engine.embedding import Embedder, embed

log = logging.getLogger(__name__)


# client -> embedder
@dataclass(frozen=True)
class EmbedJob:
    rows: tuple[tuple[int, ...], ...]  # token ids, one tuple per input
    sink: ObjectSendStream[EmbedEvent]


# embedder -> client
@dataclass(frozen=True)
class Embedded:
    vectors: np.ndarray  # [len(rows), dimensions] float32


@dataclass(frozen=True)
class EmbedFailed:
    message: str
    status_code: int = 500


EmbedEvent = Embedded | EmbedFailed


def job_tokens(job: EmbedJob) -> int:
    return sum(len(row) for row in job.rows)


async def embedder_actor(e: Embedder, inbox: ObjectReceiveStream[EmbedJob], metrics: EngineMetrics) -> None:
    await serve_batches(inbox, e.max_batch_tokens, job_tokens, lambda jobs: _embed_jobs(e, jobs, metrics))


async def _embed_jobs(e: Embedder, jobs: list[EmbedJob], metrics: EngineMetrics) -> None:
    rows = [row for job in jobs for row in job.rows]
    try:
        vectors, passes = await anyio.to_thread.run_sync(embed, e, rows)
    except Exception as exc:  # a failing batch fails its requests; the actor serves the next batch
        log.exception("embedding %d inputs failed", len(rows))
        for job in jobs:
            offer(job.sink, EmbedFailed(f"embedding failed: {type(exc).__name__}: {exc}"))
        return
    metrics.embedding_requests.labels(e.model_id).inc(len(jobs))
    metrics.embedding_forward_passes.labels(e.model_id).inc(passes)
    metrics.embedding_batch_requests.labels(e.model_id).observe(len(jobs))
    position = 0
    for job in jobs:
        offer(job.sink, Embedded(vectors[position:position + len(job.rows)]))
        position += len(job.rows)
