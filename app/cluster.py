"""The request path's seam to the deployments: `Cluster` is what a request needs from them
(Serve handles in the app: `app.serve_cluster.ServeCluster`; in-process engines in tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from deployments.protocol import (
    DecodeJob,
    KVHandoff,
    LoadReport,
    Plan,
    PlanRequest,
    PrefillJob,
    ReadCapacity,
    StoredPrefix,
)
from engine.output import RequestOutput


class Cluster(Protocol):
    """The hops of one request, and what the ingress reads about the engines."""

    async def plan(self, request: PlanRequest) -> Plan:
        """The Scheduler's choice of PE, DE and read sides for one choice."""
        ...

    async def lookup(self, block_keys: tuple[bytes, ...]) -> StoredPrefix:
        """How much of a prompt's block chain is stored, as the cluster index has it now."""
        ...

    def release(self, request_id: str) -> None:
        """Fire and forget: a planned choice ended before its DE took it."""
        ...

    async def replace_decode(
        self, request_id: str, lost_replica: str, num_tokens: int
    ) -> tuple[str, str] | None:
        """A decode replica was lost under `request_id`: the Scheduler forgets it and picks a
        live decode replica on any node for the request's `num_tokens` of KV; (node, replica),
        or None if it cannot say (the choice then stays with the lost replica's node)."""
        ...

    async def lost(self, replica_id: str) -> None:
        """An engine replica was lost: the Scheduler stops planning onto it at once (its node
        may be gone, and with it every replica there; the Scheduler's node watch drops
        those too)."""
        ...

    async def load(
        self, node: str, keys: Sequence[bytes], request_id: str = "", dram_only: bool = False
    ) -> list[Any]:
        """Read stored blocks into `node`'s DRAM: handles of the leading blocks that arrived.
        `dram_only`: only what `node`'s DRAM holds (a pull by another node's engines)."""
        ...

    def prefill(self, node: str, job: PrefillJob) -> AsyncIterator[RequestOutput | KVHandoff]:
        """The first output, then the KV handoff (none if the choice finished at once)."""
        ...

    def decode(self, node: str, job: DecodeJob) -> AsyncIterator[RequestOutput]:
        """The rest of the choice's outputs."""
        ...


class ClusterStatus(Protocol):
    """What admission and `/health` read about the engines (the Scheduler's view)."""

    async def engines(self) -> list[LoadReport]: ...

    async def read_capacity(self) -> ReadCapacity: ...


class ReplicaLost(RuntimeError):
    """An engine replica died or became unreachable mid-call (the cluster's translation of
    its transport's error, e.g. Ray's actor errors): the request itself may be retried.
    `role` says whose: "prefill", "decode", or "" (the Scheduler, a TrafficManager)."""

    def __init__(self, message: str, role: str = ""):
        super().__init__(message)
        self.role = role
