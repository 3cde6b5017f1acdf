"""GET /metrics in Prometheus text format, from the server's own CollectorRegistry.

Three sources feed it: HTTP requests by endpoint and status (counted here, after each response is
made), per-request engine metrics (tokens, TTFT, time per output token, end-to-end latency; observed
by `EngineClient.generate`), and engine state (queue, batch, KV blocks, preemptions, failed steps):
the SchedulerStats each engine's scheduler actor publishes, read from its client at scrape time.
Process metrics (resident memory, CPU seconds, open files) come from prometheus_client's ProcessCollector.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from quart import Blueprint, Quart, Response, current_app, request

bp = Blueprint("metrics", __name__)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class EngineStateCollector(Collector):
    """Reads each loaded engine's last published SchedulerStats when Prometheus scrapes."""

    def __init__(self, models) -> None:
        self.models = models

    def collect(self) -> Iterator[Metric]:
        label = ["model"]
        families = {
            "waiting": GaugeMetricFamily("transerve_num_requests_waiting", "Requests queued in the scheduler (preempted "
                                         "ones included)", labels=label),
            "running": GaugeMetricFamily("transerve_num_requests_running", "Requests in the running batch", labels=label),
            "in_flight": GaugeMetricFamily("transerve_num_requests_in_flight", "Engine requests admitted and not yet "
                                           "ended, the number --max-queued-requests bounds", labels=label),
            "kv_used": GaugeMetricFamily("transerve_kv_blocks_used", "KV cache blocks held by requests", labels=label),
            "kv_free": GaugeMetricFamily("transerve_kv_blocks_free", "KV cache blocks free (prefix-cached ones "
                                         "included: they are reused on demand)", labels=label),
            "preemptions": CounterMetricFamily("transerve_num_preemptions", "Requests preempted because the KV cache "
                                               "ran out", labels=label),
            "step_failures": CounterMetricFamily("transerve_step_failures", "Model steps that raised (their requests "
                                                 "failed with 500)", labels=label),
        }
        for name, engine in list(self.models.engines.items()):
            stats = engine.stats
            if stats is None:
                continue  # a Whisper model has no scheduler or KV cache (its batches: transerve_transcription_*)
            families["waiting"].add_metric([name], stats.num_waiting)
            families["running"].add_metric([name], stats.num_running)
            families["in_flight"].add_metric([name], engine.num_in_flight)
            families["kv_used"].add_metric([name], stats.kv_blocks_used)
            families["kv_free"].add_metric([name], stats.kv_blocks_free)
            families["preemptions"].add_metric([name], stats.num_preemptions)
            families["step_failures"].add_metric([name], stats.num_failed_steps)
        yield from families.values()


def install_metrics(app: Quart, models) -> CollectorRegistry:
    """Register the HTTP and engine-state metrics in the engines' registry and serve /metrics."""
    registry: CollectorRegistry = models.metrics.registry
    requests = Counter("transerve_http_requests", "HTTP requests by endpoint (route), method and status",
                       ["endpoint", "method", "status"], registry=registry)
    registry.register(EngineStateCollector(models))
    ProcessCollector(registry=registry)
    app.config["METRICS_REGISTRY"] = registry

    @app.after_request
    async def _count(response: Response) -> Response:
        # The route, not the path: arbitrary URLs must not grow the label set without bound.
        rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
        method = request.method if request.method in _METHODS else "other"
        requests.labels(rule, method, str(response.status_code)).inc()
        return response

    app.register_blueprint(bp)
    return registry


@bp.get("/metrics")
async def metrics():
    body = generate_latest(current_app.config["METRICS_REGISTRY"])
    return Response(body, status=200, content_type=CONTENT_TYPE_LATEST)
