"""Per-request engine metrics, observed where every endpoint's events pass: `EngineClient.generate`.

Each server has its own CollectorRegistry (never prometheus_client's global one), so several servers
in one process, as in tests, keep separate counts. Gauges of engine state (queue, batch, KV blocks)
are read at scrape time instead, by the collector in `transerve.http.metrics`.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram

from transerve.actors.messages import RequestError, RequestEvent, TextDelta

# Seconds; wide enough for a CPU box and a long answer, fine enough for a GPU's first token.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, model = self.registry, ["model"]
        self.prompt_tokens = Counter("transerve_prompt_tokens", "Prompt tokens of requests that finished", model, registry=r)
        self.prompt_tokens_cached = Counter("transerve_prompt_tokens_cached", "Prompt tokens of finished requests whose "
                                            "KV cache came from the prefix cache (hit rate: divide by prompt tokens)",
                                            model, registry=r)
        self.generation_tokens = Counter("transerve_generation_tokens", "Tokens generated (aborted requests included)",
                                         model, registry=r)
        self.requests_finished = Counter(
            "transerve_requests_finished", "Engine requests by how they ended: stop, length, tool_calls, abort (the "
            "client left), error (rejected or failed)", ["model", "reason"], registry=r)
        self.requests_rejected = Counter("transerve_requests_rejected",
                                         "Requests turned away with 429 because the queue was full", model, registry=r)
        self.ttft = Histogram("transerve_time_to_first_token_seconds", "From the request reaching the engine to its "
                              "first token", model, buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("transerve_time_per_output_token_seconds", "Mean time between output tokens, per request",
                              model, buckets=_PER_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("transerve_e2e_request_latency_seconds", "From the request reaching the engine to its "
                             "last event", model, buckets=_LATENCY_BUCKETS, registry=r)
        # Whisper models: how many 30 s windows (and requests) each batched decode took together.
        self.transcription_batch_windows = Histogram("transerve_transcription_batch_windows", "Audio windows decoded "
                                                     "together in one batched Whisper generate", model,
                                                     buckets=_BATCH_BUCKETS, registry=r)
        self.transcription_batch_requests = Histogram("transerve_transcription_batch_requests", "Transcription "
                                                      "requests decoded together in one batched Whisper generate", model,
                                                      buckets=_BATCH_BUCKETS, registry=r)
        # Embedding models: requests that shared forward passes (fewer passes than requests: they did).
        self.embedding_requests = Counter("transerve_embedding_requests", "Embedding requests answered", model,
                                          registry=r)
        self.embedding_forward_passes = Counter("transerve_embedding_forward_passes", "Forward passes of embedding "
                                                "models (one padded batch of inputs each)", model, registry=r)
        self.embedding_batch_requests = Histogram("transerve_embedding_batch_requests", "Embedding requests embedded "
                                                  "together in one batch", model, buckets=_BATCH_BUCKETS, registry=r)

    def track(self, model_id: str, num_choices: int = 1) -> ChoiceTrackers:
        return ChoiceTrackers([RequestTracker(self, model_id) for _ in range(num_choices)])


class ChoiceTrackers:
    """The trackers of one HTTP request's choices (n samples, or a list of prompts), by event index."""

    def __init__(self, trackers: list[RequestTracker]) -> None:
        self.trackers = trackers

    def on_event(self, event: RequestEvent) -> None:
        index = getattr(event, "index", 0)
        if 0 <= index < len(self.trackers):
            self.trackers[index].on_event(event)

    def fail(self) -> None:
        for tracker in self.trackers:
            tracker.reason = "error"

    def finish(self) -> None:
        for tracker in self.trackers:
            tracker.finish()


class RequestTracker:
    """Watches one request's events go by; `finish()` records it, however it ended."""

    def __init__(self, metrics: EngineMetrics, model_id: str) -> None:
        self.metrics = metrics
        self.model_id = model_id
        self.start = time.monotonic()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.num_tokens = 0
        self.num_prompt_tokens: int | None = None
        self.num_cached_tokens = 0
        self.reason = "abort"  # unless an event says otherwise, the client left before the end

    def on_event(self, event: RequestEvent) -> None:
        if isinstance(event, RequestError):
            self.reason = "error"
            return
        if isinstance(event, TextDelta):
            if event.token_ids:
                now = time.monotonic()
                self.first_token_at = self.first_token_at or now
                self.last_token_at = now
                self.num_tokens += len(event.token_ids)
            if event.usage is not None:
                self.num_tokens = event.usage.completion_tokens
                self.num_prompt_tokens = event.usage.prompt_tokens
                self.num_cached_tokens = event.usage.cached_tokens
            if event.finish_reason is not None:
                self.reason = event.finish_reason

    def finish(self) -> None:
        m, model = self.metrics, self.model_id
        m.requests_finished.labels(model, self.reason).inc()
        m.generation_tokens.labels(model).inc(self.num_tokens)
        if self.num_prompt_tokens is not None:
            m.prompt_tokens.labels(model).inc(self.num_prompt_tokens)
            m.prompt_tokens_cached.labels(model).inc(self.num_cached_tokens)
        if self.first_token_at is None:
            return  # rejected or failed before any token: no latency to speak of
        m.ttft.labels(model).observe(self.first_token_at - self.start)
        m.e2e.labels(model).observe(time.monotonic() - self.start)
        if self.num_tokens > 1 and self.last_token_at is not None:
            m.tpot.labels(model).observe((self.last_token_at - self.first_token_at) / (self.num_tokens - 1))
