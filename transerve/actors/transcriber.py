"""The transcriber actor: batches every waiting transcription into one Whisper decode.

A Whisper model gets this actor instead of the paged text engine's four; its client
(transcription_client.py) prepares each request's features and turns the tokens sent back into text.
Requests wait in a bounded mailbox; the actor takes the first, drains whatever else is waiting (up
to `max_windows` windows), groups the jobs by the options one `generate` call must share, runs each
group in a worker thread, and answers each job on its own stream. A client that left is skipped or
ignored; it never fails the batch for the others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import numpy as np
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from transerve.actors.metrics import EngineMetrics
from transerve.engine.whisper import DecodeOptions, Transcriber, WindowResult, decode_windows

log = logging.getLogger(__name__)
Job = TypeVar("Job")


# client -> transcriber
@dataclass(frozen=True)
class TranscribeJob:
    job_id: str
    features: np.ndarray  # [windows, mel bins, frames]
    language: str | None  # None: the model detects it per window
    options: DecodeOptions
    sink: ObjectSendStream[TranscribeEvent]
    stream_tokens: bool = False  # send a WindowToken for each token as it is decoded


# transcriber -> client
@dataclass(frozen=True)
class WindowToken:
    window: int  # which of the job's windows
    token_id: int


@dataclass(frozen=True)
class WindowsDone:
    results: tuple[WindowResult, ...]  # one per window, in order


@dataclass(frozen=True)
class TranscribeFailed:
    message: str
    status_code: int = 500


TranscribeEvent = WindowToken | WindowsDone | TranscribeFailed


def take_waiting(first: Job, inbox: ObjectReceiveStream[Job], limit: int, size: Callable[[Job], int]) -> list[Job]:
    """`first` and whatever else waits in the mailbox, while their sizes (windows, tokens) fit in `limit`."""
    jobs, total = [first], size(first)
    while total < limit:
        try:
            job = inbox.receive_nowait()
        except (anyio.WouldBlock, anyio.EndOfStream):
            break
        jobs.append(job)
        total += size(job)
    return jobs


def group_by_options(jobs: list[TranscribeJob]) -> list[list[TranscribeJob]]:
    groups: dict[DecodeOptions, list[TranscribeJob]] = {}
    for job in jobs:
        groups.setdefault(job.options, []).append(job)
    return list(groups.values())


def client_left(job: TranscribeJob) -> bool:
    return job.sink.statistics().open_receive_streams == 0


def offer(sink: ObjectSendStream, event: Any) -> None:
    """Deliver without waiting; a client that left (closed its end) just misses it."""
    try:
        sink.send_nowait(event)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.WouldBlock):
        pass


async def serve_batches(inbox: ObjectReceiveStream[Job], limit: int, size: Callable[[Job], int],
                        run: Callable[[list[Job]], Awaitable[None]]) -> None:
    """The batching actors' loop (this one and actors/embedder.py): take every job waiting, up to `limit`,
    run those whose client is still there as one batch, and end each job's stream."""
    async with inbox:
        while True:
            try:
                first = await inbox.receive()
            except anyio.EndOfStream:
                return
            taken = take_waiting(first, inbox, limit, size)
            try:
                if jobs := [job for job in taken if not client_left(job)]:
                    await run(jobs)
            finally:  # each job's stream ends here, however the batch went (cancellation included)
                for job in taken:
                    job.sink.close()


async def transcriber_actor(t: Transcriber, inbox: ObjectReceiveStream[TranscribeJob], metrics: EngineMetrics) -> None:
    async def run(jobs: list[TranscribeJob]) -> None:
        for group in group_by_options(jobs):
            await _decode_group(t, group, metrics)

    await serve_batches(inbox, t.max_windows, lambda job: len(job.features), run)


async def _decode_group(t: Transcriber, jobs: list[TranscribeJob], metrics: EngineMetrics) -> None:
    features = np.concatenate([job.features for job in jobs])
    languages = [job.language for job in jobs for _ in range(len(job.features))]
    rows = [(job, window) for job in jobs for window in range(len(job.features))]  # batch row -> (job, window)

    def on_token(row: int, token_id: int) -> None:  # in the worker thread
        job, window = rows[row]
        if job.stream_tokens:
            anyio.from_thread.run_sync(offer, job.sink, WindowToken(window, token_id))

    streaming = any(job.stream_tokens for job in jobs)
    metrics.transcription_batch_windows.labels(t.model_id).observe(len(rows))
    metrics.transcription_batch_requests.labels(t.model_id).observe(len(jobs))
    started = time.monotonic()
    try:
        results = await anyio.to_thread.run_sync(decode_windows, t, features, languages, jobs[0].options,
                                                 on_token if streaming else None)
    except ValueError as exc:  # an option the model refuses (a language it does not know, ...)
        for job in jobs:
            offer(job.sink, TranscribeFailed(str(exc), 400))
        return
    except Exception as exc:  # a failing batch fails its requests; the actor serves the next batch
        log.exception("transcription of %d windows failed", len(rows))
        for job in jobs:
            offer(job.sink, TranscribeFailed(f"transcription failed: {type(exc).__name__}: {exc}", 500))
        return
    log.debug("transcribed %d windows of %d requests in %.2f s", len(rows), len(jobs), time.monotonic() - started)
    position = 0
    for job in jobs:
        count = len(job.features)
        offer(job.sink, WindowsDone(tuple(results[position:position + count])))
        position += count
