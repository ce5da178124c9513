"""ReplicaPinnedRouter: Serve routes a job to the replica the Scheduler chose.

The job (first positional argument) carries `target_replica`, the unique id of the replica
the Scheduler planned. When that replica is among the candidates it is the only choice; when
it is gone (restarted, scaled down) or no target was given, the least-loaded replicas by
their published routing stats (queued tokens, then running sequences) are offered, so Serve
still owns health, retries and back-pressure.

NOTE: no FIFOMixin: its FIFO matching could hand the replica picked for one request to
another request with a different target. The base router matches by request id.
"""

from __future__ import annotations

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica


def target_of(pending_request: PendingRequest | None, attribute: str) -> str | None:
    if pending_request is None or not pending_request.args:
        return None
    return getattr(pending_request.args[0], attribute, None)


def load_key(replica: RunningReplica) -> tuple[float, float]:
    stats = replica.routing_stats or {}
    return (float(stats.get("queued_tokens", 0)), float(stats.get("running", 0)))


class ReplicaPinnedRouter(RequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        target = target_of(pending_request, "target_replica")
        if target is not None:
            pinned = [r for r in candidate_replicas if r.replica_id.unique_id == target]
            if pinned:
                return [pinned]
        return [sorted(candidate_replicas, key=load_key)[:2]] if candidate_replicas else []
