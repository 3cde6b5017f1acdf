"""Admission control: how many engine requests one engine takes before it answers 429.

At most a full batch (`max_num_seqs`) runs and `max_queued_requests` more wait. Counting at the
engine client, before tokenization, turns a burst away at once instead of queueing it without bound;
a client is better served retrying later (or against another replica) than waiting in a long queue.
"""

from __future__ import annotations

from transerve.actors.metrics import EngineMetrics
from transerve.config import SchedulerConfig


class EngineOverloadedError(Exception):
    """The engine's queue is full; the HTTP layer answers 429 with Retry-After."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Admission:
    def __init__(self, model_id: str, config: SchedulerConfig, metrics: EngineMetrics) -> None:
        self.model_id = model_id
        self.rejected = metrics.requests_rejected.labels(model_id)
        self.limit = config.max_num_seqs + config.max_queued_requests
        self.num_in_flight = 0  # engine requests (choices) from admission until their stream ends

    def enter(self, num_requests: int) -> None:
        """Admit `num_requests` choices of one HTTP request, all or none; raises EngineOverloadedError."""
        # An idle engine takes any request, so one asking for more choices than the limit still runs.
        if self.num_in_flight and self.num_in_flight + num_requests > self.limit:
            self.rejected.inc()
            raise EngineOverloadedError(
                f"{self.model_id} is at its limit of {self.limit} requests in flight "
                f"(--max-num-seqs plus --max-queued-requests); retry shortly"
            )
        self.num_in_flight += num_requests

    def leave(self, num_requests: int) -> None:
        self.num_in_flight -= num_requests
