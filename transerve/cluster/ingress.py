"""The ingress: transerve's own Quart app (every endpoint, error and metric as `transerve serve` has
them) served by Ray Serve, whose one engine is a RemoteEngineClient over the replicas. /health and
/v1/models report the replicas; /metrics adds per-replica families and sums their engine state."""

from __future__ import annotations

from quart import jsonify

from transerve.actors.registry import Models
from transerve.cluster.board import ReplicaBoard, ReplicaCollector
from transerve.cluster.lifetime import Lifetime
from transerve.cluster.remote_client import RemoteEngineClient
from transerve.config import ServerConfig
from transerve.http.app import create_app
from transerve.http.errors import error_body


class ClusterIngress:
    async def __init__(self, replicas, spec: str, config: ServerConfig, num_replicas: int,
                       stats_period_s: float = 1.0) -> None:
        self.replicas, self.spec, self.config = replicas, spec, config
        self.board = ReplicaBoard(replicas, num_replicas, stats_period_s)
        self.lifetime: Lifetime[Models] = Lifetime()
        self.models = await self.lifetime.start(self._start, self._stop)

    async def _start(self, task_group) -> Models:
        info = await self.replicas.describe.remote()
        await self.board.poll_once()
        task_group.start_soon(self.board.run)
        models = Models(self.config.engine, task_group, self.config.mailbox_size, forced=self.spec)
        models.engines[self.spec] = RemoteEngineClient(info, self.replicas, self.board, models.metrics)
        models.metrics.registry.register(ReplicaCollector(self.board))
        return models

    async def _stop(self, models: Models) -> None:
        await models.aclose()

    def __serve_build_asgi_app__(self):
        app = create_app(self.models, self.config)
        board = self.board
        list_models = app.view_functions["models.list_models"]

        async def health():
            if not board.replicas:
                return jsonify({**error_body("no engine replica is up", 503), **board.summary()}), 503
            return jsonify({"status": "ok", "replicas": board.summary()})

        async def list_models_with_replicas():
            listing = await (await list_models()).get_json()
            for entry in listing["data"]:
                if entry.get("loaded"):
                    entry["replicas"] = board.summary()
            return jsonify(listing)

        app.view_functions["models.health"] = health
        app.view_functions["models.list_models"] = list_models_with_replicas
        return app

    async def __del__(self) -> None:
        await self.lifetime.stop()
