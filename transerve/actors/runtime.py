"""Wires one engine's actors: builds the bounded mailboxes, starts the actors in the given task group,
and returns the engine's client, the only thing the HTTP layer sees of it.

A text model gets four actors (tokenizer, scheduler, executor, detokenizer); a Whisper model one
(the transcriber), an embedding model one (the embedder). Loading is `assembly.load`; the registry of engines is `registry.Models`.
"""

from __future__ import annotations

import anyio
from anyio.abc import TaskGroup

from transerve.actors.assembly import LoadedModel
from transerve.actors.background_compile import BackgroundCompile
from transerve.actors.client import EngineClient
from transerve.actors.detokenizer import detokenizer_actor
from transerve.actors.embedder import EmbedJob, embedder_actor
from transerve.actors.embedding_client import EmbeddingClient
from transerve.actors.executor import executor_actor
from transerve.actors.metrics import EngineMetrics
from transerve.actors.scheduler import SchedulerActor
from transerve.actors.tokenizer import tokenizer_actor
from transerve.actors.transcriber import TranscribeJob, transcriber_actor
from transerve.actors.transcription_client import TranscriptionClient
from transerve.engine.embedding import Embedder
from transerve.engine.whisper import Transcriber
from transerve.parallel.steps import TensorParallelRunner


async def start_engine(task_group: TaskGroup, loaded: LoadedModel | Transcriber | Embedder, mailbox_size: int,
                       metrics: EngineMetrics | None = None) -> EngineClient | TranscriptionClient | EmbeddingClient:
    metrics = metrics if metrics is not None else EngineMetrics()
    if isinstance(loaded, Transcriber):
        jobs_send, jobs_recv = anyio.create_memory_object_stream[TranscribeJob](mailbox_size)
        task_group.start_soon(transcriber_actor, loaded, jobs_recv, metrics)
        return TranscriptionClient(loaded, jobs_send)
    if isinstance(loaded, Embedder):
        embed_send, embed_recv = anyio.create_memory_object_stream[EmbedJob](mailbox_size)
        task_group.start_soon(embedder_actor, loaded, embed_recv, metrics)
        return EmbeddingClient(loaded, embed_send)
    tok_send, tok_recv = anyio.create_memory_object_stream(mailbox_size)
    sched_send, sched_recv = anyio.create_memory_object_stream(mailbox_size)
    exec_send, exec_recv = anyio.create_memory_object_stream(1)
    result_send, result_recv = anyio.create_memory_object_stream(1)
    detok_send, detok_recv = anyio.create_memory_object_stream(mailbox_size)
    client = EngineClient(loaded, tok_send, metrics)
    scheduler = SchedulerActor(loaded.core, loaded.eos_token_ids, sched_recv, exec_send, result_recv, detok_send.clone(),
                               publish_stats=client.update_stats)
    task_group.start_soon(tokenizer_actor, loaded.tokenizer, loaded.max_model_len, loaded.core.kv_capacity, tok_recv,
                          detok_send, sched_send, loaded.image_prompts, loaded.vocab_size)
    task_group.start_soon(scheduler.run)
    task_group.start_soon(executor_actor, loaded.runner, exec_recv, result_send, BackgroundCompile.of(loaded.model_id, loaded.runner))
    task_group.start_soon(detokenizer_actor, loaded.tokenizer, detok_recv)
    if isinstance(loaded.runner, TensorParallelRunner):  # stops the server when a rank dies
        task_group.start_soon(loaded.runner.ranks.watch, client.closed)
    return client
