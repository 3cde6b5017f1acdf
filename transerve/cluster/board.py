"""The ingress's view of the replicas: each one's ReplicaStats, polled with a Serve broadcast, summed
for the engine-wide gauges and listed per replica on /metrics (`transerve_replica_*{replica=...}`)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import fields

import anyio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from transerve.cluster.replica import ReplicaStats
from transerve.engine.stats import SchedulerStats

log = logging.getLogger(__name__)


class ReplicaBoard:
    def __init__(self, replicas, expected: int, period_s: float = 1.0) -> None:
        self.replicas_handle = replicas
        self.expected = expected  # replicas asked for
        self.period_s = period_s
        self.replicas: list[ReplicaStats] = []  # those that answered the last poll

    async def poll_once(self) -> None:
        try:
            results = await self.replicas_handle.broadcast("stats").results_async(
                timeout_s=self.period_s + 2, return_exceptions=True)
        except TimeoutError:
            results = []
        self.replicas = sorted((r for r in results if isinstance(r, ReplicaStats)), key=lambda r: r.replica)

    async def run(self) -> None:
        while True:
            await self.poll_once()
            await anyio.sleep(self.period_s)

    def total(self) -> SchedulerStats:
        """The replicas' scheduler stats summed: what /metrics' engine gauges show at the ingress."""
        names = [f.name for f in fields(SchedulerStats)]
        return SchedulerStats(**{n: sum(getattr(r.scheduler, n) for r in self.replicas) for n in names})

    def summary(self) -> dict:
        return {"healthy": len(self.replicas), "expected": self.expected}


class ReplicaCollector(Collector):
    """Per-replica families for /metrics, from the board's last poll."""

    def __init__(self, board: ReplicaBoard) -> None:
        self.board = board

    def collect(self) -> Iterator[Metric]:
        label = ["replica"]
        up = GaugeMetricFamily("transerve_replicas_healthy", "Replicas that answered the last stats poll")
        up.add_metric([], len(self.board.replicas))
        info = GaugeMetricFamily("transerve_replica_info", "One per live replica: its process and node",
                                 labels=["replica", "pid", "node"])
        in_flight = GaugeMetricFamily("transerve_replica_requests_in_flight", "Engine requests admitted and not "
                                      "yet ended, per replica", labels=label)
        running = GaugeMetricFamily("transerve_replica_requests_running", "Requests in the running batch",
                                    labels=label)
        kv_used = GaugeMetricFamily("transerve_replica_kv_blocks_used", "KV cache blocks held by requests",
                                    labels=label)
        requests = CounterMetricFamily("transerve_replica_requests", "Engine requests ended, per replica",
                                       labels=label)
        prompt = CounterMetricFamily("transerve_replica_prompt_tokens", "Prompt tokens of finished requests",
                                     labels=label)
        cached = CounterMetricFamily("transerve_replica_prefix_cache_hit_tokens", "Prompt tokens served from the "
                                     "replica's prefix cache", labels=label)
        generated = CounterMetricFamily("transerve_replica_generation_tokens", "Tokens generated, per replica",
                                        labels=label)
        for r in self.board.replicas:
            info.add_metric([r.replica, str(r.pid), r.node], 1)
            in_flight.add_metric([r.replica], r.num_in_flight)
            running.add_metric([r.replica], r.scheduler.num_running)
            kv_used.add_metric([r.replica], r.scheduler.kv_blocks_used)
            requests.add_metric([r.replica], r.requests)
            prompt.add_metric([r.replica], r.prompt_tokens)
            cached.add_metric([r.replica], r.cached_prompt_tokens)
            generated.add_metric([r.replica], r.generation_tokens)
        yield from (up, info, in_flight, running, kv_used, requests, prompt, cached, generated)
