"""TrafficManager deployment: one per logical node. Owns the node's KV store (DRAM blocks in
the object store, owned by this long-lived actor; NVMe through the node's StorageNIC),
pushes NodeReports (SNIC queues + index events) to the Scheduler, and aggregates the
transfer counters the node's engines report."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from ray.serve.handle import DeploymentHandle

from deployments.options import EngineReplicaOptions, KVStoreSection
from deployments.protocol import TransferReport
from deployments.traffic.manager import TrafficManager as _TrafficManager
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
        store = None
        if kvstore.enabled:
            block_size = engine.engine.block_size
            store = TieredStore(
                node,
                DRAMTier(kvstore.dram_bytes),
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
                block_nbytes=engine.engine.engine_config(engine.model, None).kv_bytes_per_block(
                    ModelConfig.from_dir(engine.model.path.expanduser())
                ),
            )
        self.manager = _TrafficManager(node, store)
        self.scheduler = scheduler
        self.interval_s = engine.report_interval_s
        self._task = asyncio.get_running_loop().create_task(self._report_forever())

    async def load(self, keys: Sequence[bytes]) -> list[Any]:
        return await asyncio.to_thread(self.manager.load, keys)

    async def persist(self, items: Sequence[tuple[bytes, Any]]) -> int:
        blocks = [(k, block_from_object(v) if isinstance(v, tuple) else v) for k, v in items]
        return await asyncio.to_thread(self.manager.persist, blocks)

    async def record(self, report: TransferReport) -> None:
        self.manager.record(report.stats)

    async def stats(self) -> dict[str, object]:
        return self.manager.stats()

    async def _report_forever(self) -> None:
        full_sync = True  # a (re)started node replaces whatever the Scheduler had for it
        while True:
            try:
                report = self.manager.node_report(full_sync)
                full_sync = await self.scheduler.report_node.remote(report)
            except Exception:  # the Scheduler restarting must not stop the reports
                logger.warning("node report failed", exc_info=True)
                full_sync = True  # drained events may be lost: resend everything
            await asyncio.sleep(self.interval_s)

    async def __del__(self) -> None:
        task = getattr(self, "_task", None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        store = self.manager.store if hasattr(self, "manager") else None
        if store is not None:
            store.snic.close(wait=False)
