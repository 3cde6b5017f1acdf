"""Ray Serve request routers for the engine replicas (Serve's custom request-router API).

A router lives in each process holding a handle to the replicas (the ingress), and sees every request
it sends: its arguments (the GenerateRequests) and, after routing, the replica chosen. Loads are
Serve's own view: requests sent and not yet finished per replica, probed from the replicas when stale.
"""

from __future__ import annotations

from collections import Counter

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from transerve.cluster.prefix_index import PrefixIndex, choose_replica, prompt_text

PREFIX_ROUTER = "transerve.cluster.router:PrefixAwareRouter"
ROUND_ROBIN_ROUTER = "transerve.cluster.router:RoundRobinRouter"


class PrefixAwareRouter(RequestRouter):
    """Longest prompt-prefix match when it is long enough and the load balanced, else least-loaded
    (see prefix_index.choose_replica); in the spirit of SGLang's cache-aware policy."""

    def initialize_state(self, min_match_chars: int = 256, max_imbalance: int = 8,
                         max_chunks_per_replica: int = 100_000) -> None:
        self.min_match_chars = min_match_chars
        self.max_imbalance = max_imbalance
        self.index = PrefixIndex(max_chunks_per_replica)
        self.num_routed: Counter[ReplicaID] = Counter()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        text = _request_text(pending_request)
        if text is None or len(candidate_replicas) < 2:
            return [candidate_replicas]  # Serve picks the least loaded
        ids = [r.replica_id for r in candidate_replicas]
        loads = {r.replica_id: self.replica_queue_len_cache.get(r.replica_id) for r in candidate_replicas}
        if any(load is None for load in loads.values()):
            for replica, load in await self._probe_queue_lens(candidate_replicas, 0):
                loads[replica.replica_id] = load
        loads = {i: (n if n is not None else 1 << 30) for i, n in loads.items()}  # no answer to the probe: last
        keyable = len(text) - len(text) % self.index.chunk_chars
        footprints = {i: (self.index.size(i), self.num_routed[i]) for i in ids}
        chosen = choose_replica(self.index.matched_chars(text, ids), loads, footprints, keyable, self.min_match_chars,
                                self.max_imbalance)
        # When the chosen replica's queue is full, Serve falls through to the others.
        return [[self._replicas[chosen]], [r for r in candidate_replicas if r.replica_id != chosen]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        text = _request_text(pending_request)
        if text is not None:
            self.index.insert(replica_id, text)
            self.num_routed[replica_id] += 1

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._forget_gone()

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget_gone()

    def _forget_gone(self) -> None:
        """A restarted replica has a new id and an empty cache: nothing it held before is known."""
        alive = set(self._replica_id_set)
        self.index.keep_only(list(alive))
        for gone in set(self.num_routed) - alive:
            del self.num_routed[gone]


class RoundRobinRouter(RequestRouter):
    """Each replica in turn, blind to prompts: the baseline the prefix-aware router is measured against."""

    def initialize_state(self) -> None:
        self.turn = 0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        self.turn += 1
        start = self.turn % len(ordered)
        return [[ordered[start]], ordered[start + 1:] + ordered[:start]]


def _request_text(pending_request: PendingRequest | None) -> str | None:
    """The prompt text of an EngineReplica.generate call: its first choice's (all choices share it)."""
    if pending_request is None or not pending_request.args:
        return None
    requests = pending_request.args[0]
    if not isinstance(requests, (list, tuple)) or not requests or not hasattr(requests[0], "prompt_token_ids"):
        return None  # another method (stats, describe): any replica will do
    return prompt_text(requests[0])
