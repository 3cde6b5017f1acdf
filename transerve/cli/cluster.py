"""`transerve cluster MODEL --replicas N`: engine replicas on Ray Serve behind one OpenAI endpoint.

It takes every `serve` flag (each replica is a `transerve serve MODEL` engine) plus the cluster's own.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading

log = logging.getLogger("transerve")


def add_cluster_parser(sub, serve_parser: argparse.ArgumentParser) -> None:
    cluster = sub.add_parser("cluster", parents=[serve_parser], conflict_handler="resolve",
                             help="serve MODEL from N engine replicas on a Ray cluster, behind one endpoint "
                                  "(needs `pip install 'transerve[cluster]'`)")
    cluster.add_argument("--replicas", type=int, default=1, help="engine replicas (default: 1)")
    cluster.add_argument("--address", default=None,
                         help="the Ray cluster to join: 'auto' for the one `ray start` made on this box, or "
                              "HOST:PORT of its head (default: start a Ray instance for this command alone)")
    cluster.add_argument("--router", default="prefix", choices=["prefix", "round-robin"],
                         help="prefix: a prompt goes to the replica holding its longest prefix when the match is "
                              "long enough and the load balanced, else the least-loaded one; round-robin: in turn "
                              "(default: prefix)")
    cluster.add_argument("--prefix-min-chars", type=int, default=256,
                         help="shortest prompt-prefix match (characters) the prefix router follows (default: 256)")
    cluster.add_argument("--cpus-per-replica", type=float, default=1.0,
                         help="Ray CPUs each replica reserves (default: 1)")
    cluster.add_argument("--gpus-per-replica", type=float, default=None,
                         help="Ray GPUs each replica reserves (default: 1 when the cluster has GPUs and --device is "
                              "not cpu, else 0)")


def run_cluster(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from transerve.cli.serve import config_from_args

    try:
        server = config_from_args(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    if not server.model:
        log.error("transerve cluster needs MODEL: every replica serves that one model")
        return 2
    try:
        import ray
        from ray import serve

        from transerve.cluster.deploy import APP_NAME, ClusterConfig, deploy
    except ImportError as exc:
        log.error("transerve cluster needs Ray Serve (%s): pip install 'transerve[cluster]'", exc)
        return 2
    if args.address:
        ray.init(address=args.address)
    else:
        _start_local_ray(ray)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs handlers of its own
        signal.signal(signum, lambda *_: stop.set())
    try:
        gpus = args.gpus_per_replica
        if gpus is None:
            gpus = 1.0 if args.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        deploy(ClusterConfig(server, args.replicas, args.router, args.prefix_min_chars, args.cpus_per_replica, gpus))
        stop.wait()
        log.info("stopping the replicas")
    finally:
        # Joined to a cluster: remove only this application; a Ray instance of our own goes whole.
        if args.address or os.environ.get("RAY_ADDRESS"):
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        ray.shutdown()
    return 0


def _start_local_ray(ray, attempts: int = 3) -> None:
    """ray.init() for a Ray instance of our own. Ray gives its node a fixed 30 s to register, which a
    heavily loaded box can miss; then the half-started processes (our only children) go and it starts again."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(include_dashboard=False)
            return
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == attempts:
                raise
            log.warning("Ray's node did not start within Ray's 30 s (a loaded box?); trying again (%d/%d)",
                        attempt + 1, attempts)
            ray.shutdown()
            import psutil

            children = psutil.Process().children(recursive=True)
            for child in children:
                child.terminate()
            for child in psutil.wait_procs(children, timeout=10)[1]:
                child.kill()
