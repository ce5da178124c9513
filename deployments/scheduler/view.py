"""ClusterView: the Scheduler's picture of every engine, every node's SNIC, and the KV index.

Pure (no Ray, no clock of its own): callers pass `now`. Between reports the view adds what
the Scheduler itself planned (prefill tokens, decode tokens, read bytes), so a burst of
requests is spread instead of piling onto whatever looked idlest at the last report.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from deployments.protocol import LoadReport, NodeReport, Role
from kvstore.index import KVIndex


@dataclass(slots=True)
class EngineState:
    report: LoadReport
    planned_tokens: int = 0  # planned since the report (prefill work, or decode KV tokens)
    planned_requests: int = 0

    @property
    def node_id(self) -> str:
        return self.report.node_id

    @property
    def queued_tokens(self) -> int:
        """Unfinished prefill tokens (PE) or tokens planned onto it (DE)."""
        return self.report.num_queued_tokens + self.planned_tokens

    @property
    def context_tokens(self) -> int:
        """Tokens of KV it holds or will hold: the paper's tok_e for a decode engine."""
        return self.report.num_context_tokens + self.planned_tokens

    @property
    def running(self) -> int:
        """Unfinished requests: the paper's seq_e."""
        return self.report.num_running + self.report.num_waiting + self.planned_requests

    @property
    def free_blocks(self) -> int:
        blocks = -(-self.planned_tokens // self.report.block_size)
        return self.report.num_free_blocks - blocks


@dataclass(slots=True)
class NodeState:
    report: NodeReport
    planned_read_bytes: int = 0

    @property
    def read_queue_bytes(self) -> int:
        return self.report.read_queue_bytes + self.planned_read_bytes

    def rate(self, fallback_bytes_per_s: float) -> float:
        """The SNIC's read rate: its cap, else its measured throughput, else the fallback."""
        report = self.report
        return (
            report.bandwidth_bytes_per_s
            or report.read_throughput_bytes_per_s
            or fallback_bytes_per_s
        )

    def read_queue_s(self, fallback_bytes_per_s: float) -> float:
        """Seconds until a read queued now would start."""
        return self.read_queue_bytes / self.rate(fallback_bytes_per_s)


class ClusterView:
    def __init__(self, stale_after_s: float = 15.0):
        self.stale_after_s = stale_after_s
        self.engines: dict[str, EngineState] = {}
        self.nodes: dict[str, NodeState] = {}
        self.index = KVIndex()
        self.rr_counter = 0  # the round_robin policy's cursor
        self.drained: set[str] = set()  # replicas that get no new requests (ops drain)

    def update(self, report: LoadReport) -> None:
        self.engines[report.replica_id] = EngineState(report)

    def update_node(self, report: NodeReport, now: float = 0.0) -> bool:
        """Apply a node report; returns True when the node must send a full sync.

        A node the view has never seen (this Scheduler restarted, or the node is new) is
        asked once for everything it stores; until then its deltas are still applied.
        """
        known = report.node_id in self.nodes
        if report.full_sync:
            self.index.drop_node(report.node_id)
        self.index.apply(report.events, now)
        self.nodes[report.node_id] = NodeState(report)
        return not known and not report.full_sync

    def remove(self, replica_id: str) -> None:
        self.engines.pop(replica_id, None)

    def live(self, role: Role, now: float) -> list[EngineState]:
        return [
            e
            for e in self.engines.values()
            if e.report.role == role
            and now - e.report.timestamp_s <= self.stale_after_s
            and e.report.replica_id not in self.drained
        ]

    def node(self, node_id: str) -> NodeState | None:
        return self.nodes.get(node_id)

    def note_planned(self, replica_id: str, num_tokens: int) -> None:
        state = self.engines.get(replica_id)
        if state is not None:
            state.planned_tokens += num_tokens
            state.planned_requests += 1

    def note_read(self, node_id: str, num_bytes: int) -> None:
        state = self.nodes.get(node_id)
        if state is not None:
            state.planned_read_bytes += num_bytes

    def snapshot(self) -> list[LoadReport]:
        return [replace(e.report) for e in self.engines.values()]
