"""TrafficManager deployment: one per logical node. Owns the node's KV store (DRAM blocks in
the object store, owned by this long-lived actor; NVMe through the node's StorageNIC),
pushes NodeReports (SNIC queues + index events) to the Scheduler, and aggregates the
transfer counters the node's engines report."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import Sequence
from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments import tracing
from deployments.metrics import Metrics
from deployments.options import EngineReplicaOptions, KVStoreSection
from deployments.protocol import TransferStats
from deployments.replica import ray_node_id
from deployments.traffic.node_store import NodeKVStore
from engine.config import ModelConfig
from kvstore.snic import StorageNIC
from kvstore.store import TieredStore
from kvstore.tiers.dram import DRAMTier
from kvstore.tiers.nvme import NVMeTier
from kvstore.tiers.object_store import block_from_object, get_block, put_block

logger = logging.getLogger(__name__)


class TrafficManager:
    def __init__(
        self,
        node: str,
        engine: EngineReplicaOptions,
        kvstore: KVStoreSection,
        snic_bandwidth: int | None,
        scheduler: DeploymentHandle,
    ):
        tracing.setup_tracing(engine.tracing, f"dualpath.traffic.{node}")
        store = None
        if kvstore.enabled:
            block_size = engine.engine.block_size
            block_nbytes = engine.engine.engine_config(engine.model, None).kv_bytes_per_block(
                ModelConfig.from_dir(engine.model.path.expanduser())
            )
            store = TieredStore(
                node,
                DRAMTier(kvstore.dram_bytes, block_nbytes),
                NVMeTier(kvstore.path.expanduser(), kvstore.nvme_bytes, fsync=kvstore.fsync),
                StorageNIC(
                    node,
                    snic_bandwidth,
                    num_workers=kvstore.snic_workers,
                    min_write_share=kvstore.min_write_share,
                ),
                wrap=put_block,
                unwrap=get_block,
                block_size=block_size,
                read_timeout_s=kvstore.read_timeout_s,
                block_nbytes=block_nbytes,
            )
        self.node_store = NodeKVStore(node, store, ray_node_id())
        self.node = node
        self.block_size = engine.engine.block_size
        self.metrics = Metrics("ray")
        self._seen: dict[str, int] = {}  # counter totals already exported
        self.scheduler = scheduler
        self.interval_s = engine.report_interval_s
        self._task = asyncio.get_running_loop().create_task(self._report_forever())

    async def load(
        self,
        keys: Sequence[bytes],
        trace: dict[str, str] | None = None,
        request_id: str | None = None,
        dram_only: bool = False,
    ) -> list[Any]:
        """DRAM handles of the longest servable prefix of `keys` (`request_id`: see NodeKVStore);
        `dram_only`: another node's engines pull what this node's DRAM holds."""
        span_name = "kv.dram_pull" if dram_only else "kv.snic_read"
        with tracing.span(span_name, trace, node=self.node, blocks=len(keys)) as span:
            cancel = threading.Event()
            load = functools.partial(self.node_store.load, keys, cancel, request_id, dram_only)
            try:
                handles = await asyncio.to_thread(load)
            except asyncio.CancelledError:  # the caller left: its queued SNIC reads go too
                cancel.set()
                raise
            span.set_attribute("blocks_read", len(handles))
            return handles

    async def persist(self, items: Sequence[tuple[bytes, Any]]) -> int:
        """Background work (no request waits): each batch is its own small trace."""
        blocks = [(k, block_from_object(v) if isinstance(v, tuple) else v) for k, v in items]
        with tracing.span("kv.persist", node=self.node, blocks=len(blocks)) as span:
            new = await asyncio.to_thread(self.node_store.persist, blocks)
            span.set_attribute("new_blocks", new)
            return new

    async def record(self, stats: TransferStats) -> None:
        """An engine's cumulative transfer counters (it reports them periodically)."""
        self.node_store.record(stats)

    async def stats(self) -> dict[str, object]:
        return self.node_store.stats()

    async def _report_forever(self) -> None:
        full_sync = True  # a (re)started node replaces whatever the Scheduler had for it
        while True:
            try:
                report = self.node_store.node_report(full_sync)
                full_sync = await self.scheduler.report_node.remote(report)
                self._export_metrics()
            except Exception:  # the Scheduler restarting must not stop the reports
                logger.warning("node report failed", exc_info=True)
                full_sync = True  # drained events may be lost: resend everything
            await asyncio.sleep(self.interval_s)

    def _export_metrics(self) -> None:
        store = self.node_store.store
        if store is None:
            return
        snic = store.snic.metrics()
        m, node = self.metrics, self.node
        m.set("dualpath_snic_queue_bytes", snic.read_queue_bytes, node=node, direction="read")
        m.set("dualpath_snic_queue_bytes", snic.write_queue_bytes, node=node, direction="write")
        blocks = store.counters
        totals = {"read": snic.bytes_read_total, "write": snic.bytes_written_total}
        totals |= {t: blocks[f"blocks_from_{t}"] * self.block_size for t in ("dram", "nvme")}
        for name, total in totals.items():
            delta, self._seen[name] = total - self._seen.get(name, 0), total
            if name in ("read", "write"):
                m.inc("dualpath_snic_bytes_total", delta, node=node, direction=name)
            else:
                m.inc("dualpath_kv_hit_tokens_total", delta, tier=name)

    async def __del__(self) -> None:
        task = getattr(self, "_task", None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        store = self.node_store.store if hasattr(self, "node_store") else None
        if store is not None:
            store.snic.close(wait=False)
