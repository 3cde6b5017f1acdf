"""What the HTTP layer sees of an embedding model: `embed(inputs, ...)` returns one vector per input.

The request's own task tokenizes its inputs (in a worker thread) and checks them against the model,
so a bad request is an `EmbeddingInputError` before it reaches the shared batch; the embedder actor
then runs it together with whatever else is waiting, and the Matryoshka cut is made here, per request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import anyio
import numpy as np
from anyio.abc import ObjectSendStream

from transerve.actors.embedder import EmbedEvent, Embedded, EmbedFailed, EmbedJob
from transerve.actors.transcription_client import BatchingClient
from transerve.engine.embedding import Embedder, check_dimensions, shorten, tokenize


@dataclass(frozen=True)
class Embeddings:
    vectors: np.ndarray  # [inputs, dimensions] float32
    prompt_tokens: int


class EmbeddingUnavailable(RuntimeError):
    """The model failed the batch (500) or was unloaded meanwhile (503)."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


class EmbeddingClient(BatchingClient):
    """`embed(...)`; its batches show in the transerve_embedding_* metrics."""

    def __init__(self, e: Embedder, inbox: ObjectSendStream[EmbedJob]) -> None:
        super().__init__(e.model_id, inbox)
        self.dimensions = e.dimensions
        self._e = e

    async def embed(self, inputs: Sequence[str | tuple[int, ...]], truncate: int | None = None,
                    dimensions: int | None = None) -> Embeddings:
        """Raises EmbeddingInputError (a 400) or EmbeddingUnavailable."""
        self.in_flight += 1
        try:
            check_dimensions(self._e, dimensions)  # a size the model cannot give fails before any work
            rows = await anyio.to_thread.run_sync(tokenize, self._e, inputs, truncate)
            sink, source = anyio.create_memory_object_stream[EmbedEvent](1)
            async with source:
                with sink:
                    try:
                        await self._inbox.send(EmbedJob(tuple(rows), sink.clone()))
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        raise EmbeddingUnavailable("this model was just unloaded; send the request again", 503) from None
                event = await anext(aiter(source), None)
            if isinstance(event, EmbedFailed):
                raise EmbeddingUnavailable(event.message, event.status_code)
            if not isinstance(event, Embedded):
                raise EmbeddingUnavailable("the embedding ended without a result (the server is shutting down)", 503)
            return Embeddings(shorten(event.vectors, dimensions, self._e), sum(len(row) for row in rows))
        finally:
            self.in_flight -= 1
            self.touch()
