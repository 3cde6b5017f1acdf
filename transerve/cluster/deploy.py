"""The Serve application: N engine replicas behind one ingress, and how `transerve cluster` runs it."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ray import serve
from ray.serve.config import RequestRouterConfig

from transerve.cluster.ingress import ClusterIngress
from transerve.cluster.replica import EngineReplica
from transerve.cluster.router import PREFIX_ROUTER, ROUND_ROBIN_ROUTER
from transerve.config import ServerConfig

log = logging.getLogger(__name__)

APP_NAME = "transerve"
ROUTERS = {"prefix": PREFIX_ROUTER, "round-robin": ROUND_ROBIN_ROUTER}


@dataclass(frozen=True)
class ClusterConfig:
    server: ServerConfig  # its model is what every replica serves
    replicas: int = 1
    router: str = "prefix"  # a key of ROUTERS
    prefix_min_chars: int = 256  # shortest prompt-prefix match the prefix router follows
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    stats_period_s: float = 1.0  # how often the ingress polls the replicas' stats
    health_check_period_s: float = 5.0  # how often Serve checks each replica (a dead process it sees at once)


def build_app(config: ClusterConfig):
    server = config.server
    scheduler = server.engine.scheduler
    router_kwargs = {"min_match_chars": config.prefix_min_chars} if config.router == "prefix" else {}
    replica = serve.deployment(EngineReplica).options(
        name="EngineReplica",
        num_replicas=config.replicas,
        # The engine's own admission (batch plus queue, then 429) is the limit, not Serve's default of 5;
        # Serve's is set above it, or Serve would queue the excess at the ingress without bound.
        max_ongoing_requests=2 * (scheduler.max_num_seqs + scheduler.max_queued_requests),
        ray_actor_options={"num_cpus": config.cpus_per_replica, "num_gpus": config.gpus_per_replica},
        request_router_config=RequestRouterConfig(request_router_class=ROUTERS[config.router],
                                                  request_router_kwargs=router_kwargs),
        health_check_period_s=config.health_check_period_s,
    )
    ingress = serve.deployment(serve.ingress()(ClusterIngress)).options(
        name="Ingress", num_replicas=1, max_ongoing_requests=100_000, ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(replica.bind(server.model, server.engine, server.mailbox_size), server.model, server,
                        config.replicas, config.stats_period_s)


def deploy(config: ClusterConfig) -> None:
    """Start Serve's HTTP proxy on the configured host and port and deploy; returns once every replica
    has loaded its model."""
    serve.start(http_options={"host": config.server.host, "port": config.server.port}, proxy_location="HeadOnly")
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    log.info("serving %s from %d replica(s) on http://%s:%d/v1", config.server.model, config.replicas,
             config.server.host, config.server.port)
