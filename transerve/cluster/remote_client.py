"""RemoteEngineClient: EngineClient's interface (generate, stats, num_in_flight and the attributes the
HTTP layer reads), answered by engine replicas through a Ray Serve deployment handle.

Each generate() call is one streaming call to one replica, chosen by the deployment's request router.
Leaving the iterator early cancels that call, which aborts the requests on the replica. A replica that
dies mid-answer ends the answer with a RequestError (a 503 before the first event); the router sends
later requests to the replicas still alive while Serve starts a new one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence

import anyio

from transerve.actors.admission import EngineOverloadedError
from transerve.actors.client import GenerateRequest
from transerve.actors.messages import RequestError, RequestEvent
from transerve.actors.metrics import EngineMetrics
from transerve.cluster.board import ReplicaBoard
from transerve.cluster.replica import EngineInfo
from transerve.engine.stats import SchedulerStats

log = logging.getLogger(__name__)


class RemoteEngineClient:
    def __init__(self, info: EngineInfo, replicas, board: ReplicaBoard, metrics: EngineMetrics) -> None:
        self.model_id = info.model_id
        self.max_model_len = info.max_model_len
        self.vocab_size = info.vocab_size
        self.generation_defaults = info.generation_defaults
        self.tokenizer = info.tokenizer
        self.accepts_images = info.accepts_images
        self.created = int(time.time())
        self.in_flight = 0  # HTTP requests inside generate()
        self.last_used = anyio.current_time()
        self.closed = anyio.Event()
        self.metrics = metrics
        self._replicas = replicas
        self._board = board
        self._num_in_flight = 0

    @property
    def stats(self) -> SchedulerStats:
        return self._board.total()

    @property
    def num_in_flight(self) -> int:
        """Engine requests this ingress has sent and not seen end."""
        return self._num_in_flight

    def touch(self) -> None:
        self.last_used = anyio.current_time()

    async def aclose(self) -> None:
        self.closed.set()

    async def generate(self, requests: Sequence[GenerateRequest]) -> AsyncIterator[RequestEvent]:
        if self.closed.is_set():
            yield RequestError("the server is shutting down", 503)
            return
        response = self._replicas.options(stream=True).generate.remote(list(requests))
        trackers = self.metrics.track(self.model_id, len(requests))
        self.in_flight += 1
        self._num_in_flight += len(requests)
        started = False
        try:
            async for event in response:
                started = True
                trackers.on_event(event)
                yield event
        except Exception as exc:  # the replica failed or died; CancelledError (a BaseException) passes
            if not started and _is_overloaded(exc):
                raise EngineOverloadedError(str(_cause(exc))) from None  # 429 with Retry-After
            log.warning("a replica failed during a request: %s", _cause(exc).__class__.__name__)
            trackers.fail()
            yield RequestError(f"the replica serving this request failed ({_cause(exc).__class__.__name__}); "
                               "send the request again", 503)
        finally:
            response.cancel()  # a no-op when the replica finished; an abort there when the client left
            self.in_flight -= 1
            self._num_in_flight -= len(requests)
            trackers.finish()
            self.touch()


def _cause(exc: BaseException) -> BaseException:
    """The replica's own exception inside Ray's wrapper (RayTaskError.cause), else the exception."""
    return getattr(exc, "cause", None) or exc


def _is_overloaded(exc: BaseException) -> bool:
    return isinstance(exc, EngineOverloadedError) or isinstance(_cause(exc), EngineOverloadedError)
