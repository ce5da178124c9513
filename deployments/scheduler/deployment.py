"""Scheduler deployment: holds the ClusterView (engines, node SNICs, KV index), answers
plan(). One replica per app; its state is soft: engines and nodes re-report, and a node the
Scheduler does not know is asked for a full index resync. It watches the Ray nodes: what
lived on one that died leaves the view at once (node_watch.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time

from deployments import tracing
from deployments.metrics import Metrics
from deployments.options import TracingSection
from deployments.protocol import (
    LoadReport,
    NodeReport,
    Plan,
    PlanRequest,
    ReadCapacity,
    StoredPrefix,
)
from deployments.scheduler.counters import PlanCounters
from deployments.scheduler.node_watch import watch_ray_nodes
from deployments.scheduler.policy import PolicyConfig, plan_and_note, replace_decode
from deployments.scheduler.view import ClusterView


class Scheduler:
    def __init__(
        self,
        stale_after_s: float = 15.0,
        policy_config: PolicyConfig | None = None,
        tracing_section: TracingSection | None = None,
        planned_ttl_s: float = 60.0,
    ):
        if tracing_section is not None:
            tracing.setup_tracing(tracing_section, "dualpath.scheduler")
        self.view = ClusterView(stale_after_s, planned_ttl_s)
        self.policy_config = policy_config or PolicyConfig()
        self.counters = PlanCounters()
        self.metrics = Metrics("ray")
        self.lost_ray_nodes: set[str] = set()
        self._watch: asyncio.Task[None] | None = None
        with contextlib.suppress(RuntimeError):  # no event loop: a unit test, nothing to watch
            watch = watch_ray_nodes(self.view, self.lost_ray_nodes)
            self._watch = asyncio.get_running_loop().create_task(watch)

    async def replace_decode(self, request_id: str, lost: str, num_tokens: int) -> tuple[str, str]:
        """A live decode replica (any node) for a request whose DE was lost: (node, replica)."""
        decode = replace_decode(
            request_id, lost, num_tokens, self.view, time.time(), self.policy_config
        )
        return decode.node_id, decode.report.replica_id

    async def report(self, report: LoadReport) -> None:
        self.view.update(report, time.time())
        labels = {"replica": report.replica_id, "role": report.role, "node": report.node_id}
        self.metrics.set("dualpath_engine_running", report.num_running, **labels)
        self.metrics.set("dualpath_engine_waiting", report.num_waiting, **labels)
        self.metrics.set("dualpath_engine_free_blocks", report.num_free_blocks, **labels)

    async def report_node(self, report: NodeReport) -> bool:
        """Apply a node's SNIC metrics and index events; True asks for a full resync."""
        return self.view.update_node(report, time.time())

    async def forget(self, replica_id: str) -> None:
        """A replica was lost (its caller saw it die): plan nothing more onto it."""
        self.view.remove(replica_id)

    async def plan(self, request: PlanRequest) -> Plan:
        with tracing.span("scheduler.plan", request.trace, policy=self.policy_config.name) as span:
            result = plan_and_note(request, self.view, time.time(), self.policy_config)
            span.set_attributes({"read_path": result.read_path, "engines": len(self.view.engines)})
        self.counters.add(result, request.block_keys, self.view)
        self.metrics.inc("dualpath_read_path_total", path=result.read_path)
        return result

    async def release(self, request_id: str) -> None:
        """A request ended before reaching its engines or SNICs (finished at its first token,
        failed, cancelled): what was planned for it leaves the view now, not at its TTL."""
        self.view.forget_request(request_id)

    async def lookup(self, block_keys: tuple[bytes, ...]) -> StoredPrefix:
        """How much of a prompt is stored, for admission (touches nothing)."""
        entries = self.view.index.locate(block_keys)
        reports = [e.report for e in self.view.engines.values()]
        block_bytes = max((r.kv_bytes_per_token * r.block_size for r in reports), default=0)
        snic = sum(1 for e in entries if not e.dram_nodes)
        return StoredPrefix(len(entries), snic, block_bytes)

    async def read_capacity(self) -> ReadCapacity:
        """The read rate of the SNICs this policy reads on (the PE nodes' for single_path)."""
        roles = ("prefill",) if self.policy_config.name == "single_path" else ("prefill", "decode")
        now = time.time()
        readers = {e.node_id for role in roles for e in self.view.live(role, now)}
        nodes = [s for n, s in self.view.nodes.items() if n in readers]
        return ReadCapacity(
            sum(s.rate(self.policy_config.snic_bytes_per_s) for s in nodes),
            sum(s.read_queue_bytes for s in nodes),
        )

    async def drain(self, replica_id: str, drained: bool = True) -> list[str]:
        """Stop (or, with `drained=False`, resume) planning new requests on a replica; its
        running requests finish. Matches a unique suffix of the id; returns the drained set.

        Raises:
            ValueError: no engine, or more than one, matches.
        """
        matches = [r for r in self.view.engines if r.endswith(replica_id)]
        if len(matches) != 1:
            raise ValueError(f"{replica_id!r} matches {len(matches)} engine replicas: {matches}")
        if drained:
            self.view.drained.add(matches[0])
        else:
            self.view.drained.discard(matches[0])
        return sorted(self.view.drained)

    async def engines(self) -> list[LoadReport]:
        return self.view.snapshot()

    async def stats(self) -> dict[str, object]:
        return {
            "policy": self.policy_config.name,
            "drained": sorted(self.view.drained),
            **self.counters.stats(),
            "lost_ray_nodes": len(self.lost_ray_nodes),
            "index": self.view.index.stats(),
            "nodes": {
                n: {
                    "read_queue_bytes": s.report.read_queue_bytes,
                    "write_queue_bytes": s.report.write_queue_bytes,
                    "bandwidth_bytes_per_s": s.report.bandwidth_bytes_per_s,
                }
                for n, s in self.view.nodes.items()
            },
        }
