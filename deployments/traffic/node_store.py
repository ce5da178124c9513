"""NodeKVStore: one logical node's KV store and its view of KV traffic (no Ray).

Every stored-KV read and write of a node goes through it: `load` reads a prompt's stored
prefix through the node's TieredStore (DRAM tier, NVMe tier behind the node's StorageNIC),
`persist` stores full blocks. It also aggregates the transfer counters the node's engines
report (their KVMovers) and builds the NodeReport the Scheduler reads. The Serve shell
around it, one per logical node, is `deployment.py`'s TrafficManager.

Traffic classes on the SNIC: on-path KV reads (a request waits) before persistence
writes, with a minimum write share so persistence never starves. Engine-to-engine KV moves
go over their own transport (NIXL / object store), never through the SNIC.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from deployments.protocol import NodeReport, RecentIds, TransferStats
from kvstore.index import IndexEvent
from kvstore.store import TieredStore


class NodeKVStore:
    """A node's KV store and view of KV traffic, fed by the engines' periodic reports."""

    def __init__(
        self, node_id: str = "local", store: TieredStore[Any] | None = None, ray_node_id: str = ""
    ):
        self.node_id = node_id
        self.ray_node_id = ray_node_id
        self.store = store
        self.engines: dict[str, TransferStats] = {}
        self._started = RecentIds()  # loads whose reads are on the SNIC: started_ids

    def load(
        self,
        keys: Sequence[bytes],
        cancel: threading.Event | None = None,
        request_id: str | None = None,
        dram_only: bool = False,
    ) -> list[Any]:
        """DRAM handles of the longest servable prefix of `keys` (reads through the SNIC);
        setting `cancel` (the request is gone) drops its reads still queued. Once its reads
        are on the SNIC's queue, `request_id` is named in the node's reports (`started_ids`),
        so the Scheduler stops counting them as only planned. `dram_only`: another node pulls
        what this node's DRAM holds (no SNIC read)."""
        if self.store is None or not keys:
            if request_id is not None:
                self._started.note(request_id, time.time())
            return []
        if request_id is None:
            return self.store.load(keys, cancel, dram_only=dram_only)
        return self.store.load(
            keys,
            cancel,
            on_queued=lambda: self._started.note(request_id, time.time()),
            dram_only=dram_only,
        )

    def persist(self, items: Sequence[tuple[bytes, torch.Tensor]]) -> int:
        """Store full blocks (DRAM now, NVMe in the background); returns how many were new."""
        if self.store is None:
            return 0
        return sum(self.store.persist(key, block) for key, block in items)

    def node_report(self, full_sync: bool = False) -> NodeReport:
        # NOTE: ids before the SNIC snapshot: a load named here has its reads in that snapshot
        started = self._started.within(time.time())
        snic = self.store.snic.metrics() if self.store is not None else None
        events: list[IndexEvent] = []
        if self.store is not None:
            events = self.store.snapshot_events() if full_sync else self.store.drain_events()
        return NodeReport(
            node_id=self.node_id,
            read_queue_bytes=snic.read_queue_bytes if snic else 0,
            read_queue_tokens=snic.read_queue_tokens if snic else 0,
            write_queue_bytes=snic.write_queue_bytes if snic else 0,
            bandwidth_bytes_per_s=snic.bandwidth_bytes_per_s if snic else None,
            read_throughput_bytes_per_s=snic.read_throughput_bytes_per_s if snic else 0.0,
            timestamp_s=time.time(),
            events=tuple(events),
            full_sync=full_sync,
            started_ids=started,
            ray_node_id=self.ray_node_id,
        )

    def record(self, stats: TransferStats) -> None:
        self.engines[stats.replica_id] = stats

    def stats(self) -> dict[str, object]:
        totals: dict[str, int] = {}
        for s in self.engines.values():
            for name, n in s.bytes_by_transport.items():
                totals[name] = totals.get(name, 0) + n
        return {
            "node_id": self.node_id,
            "bytes_sent": sum(s.bytes_sent for s in self.engines.values()),
            "bytes_received": sum(s.bytes_received for s in self.engines.values()),
            "num_transfers": sum(s.num_sent for s in self.engines.values()),
            "num_fallbacks": sum(s.num_fallbacks for s in self.engines.values()),
            "bytes_by_transport": totals,
            "engines": {rid: s.role for rid, s in self.engines.items()},
            "kvstore": self.store.stats() if self.store is not None else None,
            "snic": asdict(self.store.snic.metrics()) if self.store is not None else None,
        }
