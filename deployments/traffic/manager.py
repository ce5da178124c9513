"""The TrafficManager interface: every KV transfer between engines goes through a KVMover;
every stored-KV read and write of a node goes through its TrafficManager's store and SNIC.

`KVMover` lives in each engine process: it splits a request's KV into layers, hands them to
the configured transport (NIXL, or the Ray object store), falls back to the object store
when NIXL has no staging room, and counts what moved. `TrafficManager` (one per logical
node; the Serve shell is `deployment.py`) owns the node's TieredStore — DRAM tier, NVMe
tier behind the node's StorageNIC — and aggregates the engines' transfer counters.

Traffic classes on the SNIC: on-path KV reads (a request waits) before persistence
writes, with a minimum write share so persistence never starves. Engine-to-engine KV moves
go over their own transport (NIXL / object store), never through the SNIC.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch

from deployments.protocol import NodeReport, RecentIds, TransferStats
from engine.output import SequenceKV
from kvstore.index import IndexEvent
from kvstore.store import TieredStore
from kvstore.transfer.base import KVDescriptor, KVTransport

logger = logging.getLogger(__name__)


class KVMover:
    def __init__(
        self,
        transport: KVTransport,
        stats: TransferStats,
        fallback: KVTransport | None = None,
    ):
        self.transport = transport
        self.fallback = fallback
        self.stats = stats
        self._by_name = {t.name: t for t in (fallback, transport) if t is not None}
        self._held: dict[str, KVDescriptor] = {}  # waiting to be received: leases renewed
        self._held_lock = threading.Lock()
        self._renewer: threading.Thread | None = None

    def hold(self, descriptor: KVDescriptor) -> None:
        """Keep the sender's lease on `descriptor` alive until `receive` starts (the DE is
        waiting for a receive thread). A no-op for transports without leases."""
        if not hasattr(self._by_name.get(descriptor.transport), "renew"):
            return
        with self._held_lock:
            self._held[descriptor.transfer_id] = descriptor
            if self._renewer is None:
                self._renewer = threading.Thread(target=self._renew_held, daemon=True)
                self._renewer.start()

    def release(self, descriptor: KVDescriptor) -> None:
        """Tell the sender it may free the transfer now (a receiver that gave up on it)."""
        transport = self._by_name.get(descriptor.transport)
        if transport is not None:
            transport.release(descriptor)

    def unhold(self, descriptor: KVDescriptor) -> None:
        with self._held_lock:
            self._held.pop(descriptor.transfer_id, None)

    def _renew_held(self) -> None:
        """Renew every held lease once half of it is gone; a lease already too short to
        renew safely is dropped (its receive fails and the DE recomputes)."""
        while True:
            with self._held_lock:
                held = list(self._held.values())
                if not held:
                    self._renewer = None
                    return
            for descriptor in held:
                transport = self._by_name[descriptor.transport]
                lease_s = descriptor.payload.lease_s
                try:
                    if transport.lease_left_s(descriptor) < lease_s / 2:  # type: ignore[attr-defined]
                        transport.renew(descriptor)  # type: ignore[attr-defined]
                except Exception as exc:
                    logger.warning("lease of %s lost (%s)", descriptor.transfer_id, exc)
                    self.unhold(descriptor)
            time.sleep(min(d.payload.lease_s for d in held) / 8)

    def send(self, transfer_id: str, kv: SequenceKV) -> KVDescriptor:
        """Hand `kv` to the transport layer by layer; returns what the receiver needs."""
        start = time.perf_counter()
        layers = [kv.data[:, layer] for layer in range(kv.data.shape[1])]
        try:
            descriptor = self.transport.send(transfer_id, layers)
        except Exception as exc:
            if self.fallback is None or self.fallback is self.transport:
                raise
            # NOTE: e.g. the NIXL staging pool is full: slower path, same bytes.
            logger.warning(
                "KV transport %s failed (%s); using %s",
                self.transport.name,
                exc,
                self.fallback.name,
            )
            self.stats.num_fallbacks += 1
            descriptor = self.fallback.send(transfer_id, layers)
        self.stats.add(descriptor, time.perf_counter() - start, sent=True)
        return descriptor

    def receive(self, descriptor: KVDescriptor) -> torch.Tensor:
        """All layers of a transfer as one `[blocks, layers, 2, block, heads, dim]` tensor."""
        start = time.perf_counter()
        self.unhold(descriptor)  # from here recv renews the lease itself, between layers
        transport = self._by_name.get(descriptor.transport)
        if transport is None:
            raise RuntimeError(f"this engine has no {descriptor.transport!r} KV transport")
        blocks, *rest = descriptor.layer_shape
        dtype = getattr(torch, descriptor.dtype)
        data = torch.empty((blocks, descriptor.num_layers, *rest), dtype=dtype)
        num_layers = 0
        try:
            for layer, tensor in enumerate(transport.recv(descriptor)):
                data[:, layer].copy_(tensor)
                num_layers += 1
        finally:
            transport.release(descriptor)
        if num_layers != descriptor.num_layers:
            raise RuntimeError(
                f"KV transfer {descriptor.transfer_id} ended after {num_layers} "
                f"of {descriptor.num_layers} layers"
            )
        self.stats.add(descriptor, time.perf_counter() - start, sent=False)
        return data

    def close(self) -> None:
        for transport in self._by_name.values():
            transport.close()


class TrafficManager:
    """Per-node KV store and view of KV traffic, fed by the engines' periodic reports."""

    def __init__(self, node_id: str = "local", store: TieredStore[Any] | None = None):
        self.node_id = node_id
        self.store = store
        self.engines: dict[str, TransferStats] = {}
        self._started = RecentIds()  # loads whose reads are on the SNIC: started_ids

    def load(
        self,
        keys: Sequence[bytes],
        cancel: threading.Event | None = None,
        request_id: str | None = None,
    ) -> list[Any]:
        """DRAM handles of the longest servable prefix of `keys` (reads through the SNIC);
        setting `cancel` (the request is gone) drops its reads still queued. Once its reads
        are on the SNIC's queue, `request_id` is named in the node's reports (`started_ids`),
        so the Scheduler stops counting them as only planned."""
        if self.store is None or not keys:
            if request_id is not None:
                self._started.note(request_id, time.time())
            return []
        if request_id is None:
            return self.store.load(keys, cancel)
        return self.store.load(
            keys, cancel, on_queued=lambda: self._started.note(request_id, time.time())
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
