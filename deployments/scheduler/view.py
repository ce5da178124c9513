"""ClusterView: the Scheduler's picture of every engine, every node's SNIC, and the KV index.

Pure (no Ray, no clock of its own): callers pass `now`. Besides the last reports, the view
keeps the work the Scheduler itself planned and that no report shows yet — a request's miss
tokens on its PE, its prompt + output tokens on its DE, its read bytes on each read side —
keyed by request id. A request reaches its PE only after its stored KV is read and its DE
only after the PE's first token, seconds later under load, so that work must stay visible
until it lands: an entry is retired by the report that counts it (the engine's
`arrived_ids`, the node's `started_ids`), not by the next report's arrival. An entry that
no report ever confirms (its replica was lost, the client left) expires after
`planned_ttl_s`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from deployments.protocol import LoadReport, NodeReport, Role
from kvstore.index import KVIndex


@dataclass(slots=True)
class Planned:
    """Work the Scheduler planned onto one engine or node SNIC, not yet in its reports."""

    amount: dict[str, int] = field(default_factory=dict)  # request id -> tokens or bytes
    expires: dict[str, float] = field(default_factory=dict)  # request id -> expiry time
    total: int = 0

    def add(self, request_id: str, amount: int, expires_at: float) -> None:
        self.discard(request_id)  # a re-plan of the same request replaces its entry
        self.amount[request_id] = amount
        self.expires[request_id] = expires_at
        self.total += amount

    def discard(self, request_id: str) -> None:
        self.total -= self.amount.pop(request_id, 0)
        self.expires.pop(request_id, None)

    def retire(self, request_ids: tuple[str, ...], now: float) -> None:
        """Drop what a report now counts itself, and what has waited too long."""
        for request_id in request_ids:
            if request_id in self.amount:
                self.discard(request_id)
        for request_id in [r for r, t in self.expires.items() if t <= now]:
            self.discard(request_id)

    def __len__(self) -> int:
        return len(self.amount)


@dataclass(slots=True)
class EngineState:
    report: LoadReport
    planned: Planned = field(default_factory=Planned)  # prefill work (PE) or KV tokens (DE)

    @property
    def node_id(self) -> str:
        return self.report.node_id

    @property
    def planned_tokens(self) -> int:
        return self.planned.total

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
        return self.report.num_running + self.report.num_waiting + len(self.planned)

    @property
    def free_blocks(self) -> int:
        blocks = -(-self.planned_tokens // self.report.block_size)
        return self.report.num_free_blocks - blocks


@dataclass(slots=True)
class NodeState:
    report: NodeReport
    planned: Planned = field(default_factory=Planned)  # read bytes not yet on the SNIC

    @property
    def planned_read_bytes(self) -> int:
        return self.planned.total

    @property
    def read_queue_bytes(self) -> int:
        """Bytes ahead of a read submitted now: queued and in flight on the SNIC, plus reads
        planned here that have not reached it yet."""
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
    def __init__(self, stale_after_s: float = 15.0, planned_ttl_s: float = 60.0):
        self.stale_after_s = stale_after_s
        self.planned_ttl_s = planned_ttl_s  # planned work no report confirmed expires then
        self.engines: dict[str, EngineState] = {}
        self.nodes: dict[str, NodeState] = {}
        self.index = KVIndex()
        self.rr_counter = 0  # the round_robin policy's cursor
        self.tie_counter = 0  # alternates the read side between equally good choices
        self.drained: set[str] = set()  # replicas that get no new requests (ops drain)

    def update(self, report: LoadReport, now: float | None = None) -> None:
        """Apply an engine's report; what it now counts leaves the planned work."""
        state = self.engines.get(report.replica_id)
        if state is None:
            self.engines[report.replica_id] = state = EngineState(report)
        state.report = report
        state.planned.retire(report.arrived_ids, report.timestamp_s if now is None else now)

    def update_node(self, report: NodeReport, now: float = 0.0) -> bool:
        """Apply a node report; returns True when the node must send a full sync.

        A node the view has never seen (this Scheduler restarted, or the node is new) is
        asked once for everything it stores; until then its deltas are still applied.
        """
        state = self.nodes.get(report.node_id)
        known = state is not None
        if report.full_sync:
            self.index.drop_node(report.node_id)
        self.index.apply(report.events, now)
        if state is None:
            self.nodes[report.node_id] = state = NodeState(report)
        state.report = report
        state.planned.retire(report.started_ids, now)
        return not known and not report.full_sync

    def remove(self, replica_id: str) -> None:
        self.engines.pop(replica_id, None)

    def drop_ray_nodes(self, dead: set[str]) -> tuple[list[str], list[str]]:
        """Forget everything that lived on Ray nodes that died (a host lost): their engine
        replicas, and the logical nodes whose TrafficManager ran there — the SNIC state and
        every DRAM-tier entry of that node (those blocks are gone with its object store;
        blocks on the shared NVMe directory stay hits). Returns (replicas, nodes) dropped.

        A node that comes back is a new Ray node: its engines report afresh, and its
        TrafficManager's first report is a full sync (`update_node`)."""
        if not dead:
            return [], []
        replicas = [r for r, e in self.engines.items() if e.report.ray_node_id in dead]
        for replica_id in replicas:
            del self.engines[replica_id]
            self.drained.discard(replica_id)
        nodes = [n for n, s in self.nodes.items() if s.report.ray_node_id in dead]
        for node_id in nodes:
            del self.nodes[node_id]
            self.index.drop_node(node_id)
        return replicas, nodes

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

    def note_planned(self, replica_id: str, request_id: str, num_tokens: int, now: float) -> None:
        """Charge `num_tokens` of `request_id` to an engine until its report counts them."""
        state = self.engines.get(replica_id)
        if state is not None:
            state.planned.add(request_id, num_tokens, now + self.planned_ttl_s)

    def note_read(self, node_id: str, request_id: str, num_bytes: int, now: float) -> None:
        """Charge a read of `num_bytes` to a node's SNIC until its report shows it started."""
        state = self.nodes.get(node_id)
        if state is not None and num_bytes > 0:
            state.planned.add(request_id, num_bytes, now + self.planned_ttl_s)

    def forget_request(self, request_id: str) -> None:
        """Drop what was planned for a request that will not reach its engines or SNICs."""
        for engine in self.engines.values():
            engine.planned.discard(request_id)
        for node in self.nodes.values():
            node.planned.discard(request_id)

    def snapshot(self) -> list[LoadReport]:
        return [replace(e.report) for e in self.engines.values()]
