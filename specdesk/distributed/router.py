"""Conversation affinity on Ray Serve's own request-router interface.

`AffinityRouter` is Ray Serve's consistent-hash router (sessions hashed onto a ring of replicas, the
session id being the routing key the front end sets with `handle.options(session_id=...)`) with two
changes for an engine that caches KV pages per replica:

* Ring points are named by the replica's rank, not its id. Ray gives a replacement replica the rank of
  the one it replaces, so when a replica dies only its conversations move (to the ring's next replica),
  and they come back when the replacement is up; every other conversation stays where its pages are.
  A replica that reports no rank falls back to its id (Ray's default behaviour).
* A load bound (consistent hashing with bounded loads): a replica whose queue has reached both its engine's
  batch (`batch_size`: until then a new turn joins the running batch at no wait) and `load_factor` × the
  mean queue (+1) is tried after the others, so a burst of hot conversations that happen to share a
  replica spills over instead of queueing behind each other, while a turn never leaves its cached pages
  for a replica that merely has a shorter queue.

Configured through `RequestRouterConfig(request_router_class=AffinityRouter,
request_router_kwargs={"load_factor": 1.5, "batch_size": 32, "num_virtual_nodes": 100, "num_fallback_replicas": 2})`.
"""

from __future__ import annotations

import math
from typing import Any

from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter, _hash_bytes
from ray.serve.request_router import PendingRequest, ReplicaID, RunningReplica

DEFAULT_LOAD_FACTOR = 1.5


class AffinityRouter(ConsistentHashRouter):
    """Consistent hashing by conversation, ring slots by replica rank, with a load bound."""

    def initialize_state(self, **kwargs: Any) -> None:
        load_factor = kwargs.pop("load_factor", DEFAULT_LOAD_FACTOR)
        if not isinstance(load_factor, int | float) or load_factor < 1:
            raise ValueError(f"load_factor must be a number >= 1, got {load_factor!r}")
        self._load_factor = float(load_factor)
        self._batch_size = int(kwargs.pop("batch_size", 1))
        super().initialize_state(**kwargs)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        # A replica's rank arrives with its metadata; rebuild when a slot changes even if ids did not.
        slots = {r.replica_id: _slot(r) for r in replicas}
        if slots != getattr(self, "_slots", None):
            self._replica_set_snapshot = frozenset()  # forces the parent to rebuild the ring
        self._slots = slots
        super().update_replicas(replicas)

    def _rebuild_ring(self, new_snapshot: frozenset[ReplicaID]) -> None:
        points: list[tuple[int, ReplicaID]] = []
        for replica_id in new_snapshot:
            slot = self._slots.get(replica_id, replica_id.unique_id)
            points += [(_hash_bytes(f"{slot}:{i}".encode()), replica_id) for i in range(self._num_virtual_nodes)]
        points.sort(key=lambda p: (p[0], p[1].unique_id))
        self._ring_hashes = [h for h, _ in points]
        self._ring_replicas = [r for _, r in points]
        self._replica_set_snapshot = new_snapshot

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        ranked = await super().choose_replicas(candidate_replicas, pending_request)
        if len(ranked) < 2:
            return ranked
        bound = self._load_bound(candidate_replicas)
        under = [rank for rank in ranked if all(self._queue_len(r) < bound for r in rank)]
        over = [rank for rank in ranked if rank not in under]
        return under + over

    def _load_bound(self, replicas: list[RunningReplica]) -> float:
        mean = sum(self._queue_len(r) for r in replicas) / max(1, len(replicas))
        return max(math.ceil(self._load_factor * mean) + 1, self._batch_size)

    def _queue_len(self, replica: RunningReplica) -> int:
        return self.replica_queue_len_cache.get(replica.replica_id) or 0


def _slot(replica: RunningReplica) -> str:
    rank = replica.replica_metadata.get("rank")
    return f"rank-{rank}" if rank is not None else replica.replica_id.unique_id
