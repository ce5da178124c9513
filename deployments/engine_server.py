"""EngineServer: what prefill and decode replicas share, as a plain class (no Ray).

An EngineCore on an EngineLoop thread, this process's KV transport endpoint, and a periodic
LoadReport (plus transfer counters) pushed to whoever listens (the Scheduler, the node's
TrafficManager). The Serve shells only build one and forward calls to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import torch

from deployments.engine_loop import EngineLoop
from deployments.options import KVFailurePolicy
from deployments.protocol import LoadReport, Role, TransferStats
from deployments.traffic.mover import KVMover
from engine.core import EngineCore

logger = logging.getLogger(__name__)

MAX_PERSIST_BATCHES = 256  # engine steps' worth of full blocks waiting for the node's store

Reporter = Callable[[LoadReport, TransferStats], Awaitable[None]]
# DRAM handles (Ray ObjectRefs in the app, tensors in tests) -> Full Block tensors
BlockFetcher = Callable[[Sequence[Any]], Awaitable[list[torch.Tensor]]]
# full blocks that filled -> the node's KV store (persistence)
PersistSink = Callable[[list[tuple[bytes, torch.Tensor]]], Awaitable[None]]


async def local_blocks(handles: Sequence[Any]) -> list[torch.Tensor]:
    """The fetcher for in-process use: handles are the tensors themselves."""
    return list(handles)


class EngineServer:
    role: Role

    def __init__(
        self,
        engine: EngineCore,
        mover: KVMover,
        replica_id: str,
        node_id: str = "local",
        reporter: Reporter | None = None,
        report_interval_s: float = 0.25,
        fetch_blocks: BlockFetcher = local_blocks,
        persist: PersistSink | None = None,
        on_transfer_failure: KVFailurePolicy = KVFailurePolicy.RECOMPUTE,
        ray_node_id: str = "",
    ):
        self.engine = engine
        self.ray_node_id = ray_node_id
        self.mover = mover
        self.replica_id = replica_id
        self.node_id = node_id
        self.fetch_blocks = fetch_blocks
        self.persist = persist
        self.on_transfer_failure = on_transfer_failure  # the DE's
        self.num_transfer_failures = 0
        self.loop = EngineLoop(
            engine,
            name=f"{self.role}-engine",
            on_step=self._drain_persist if persist is not None else None,
        )
        self._persist_queue: asyncio.Queue[list[tuple[bytes, torch.Tensor]]] = asyncio.Queue()
        self._persist_task: asyncio.Task[None] | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self.num_persisted_blocks = 0
        self.num_persist_dropped = 0
        self._reporter = reporter
        self._report_interval_s = report_interval_s
        self._report_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._event_loop = asyncio.get_running_loop()
        if self.persist is not None:
            self._persist_task = asyncio.create_task(self._persist_forever())
        self.loop.start()
        if self._reporter is not None:
            await self._report_once()  # the Scheduler knows us before the first request
            self._report_task = asyncio.create_task(self._report_forever())

    async def close(self) -> None:
        for task in (self._report_task, self._persist_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await asyncio.to_thread(self.loop.stop)
        self.mover.close()

    def is_healthy(self) -> bool:
        return self.loop.is_alive()

    def load_report(self) -> LoadReport:
        config = self.engine.config
        cache = self.engine.runner.kv_cache
        loop = self.loop
        return LoadReport(
            replica_id=self.replica_id,
            role=self.role,
            node_id=self.node_id,
            ray_node_id=self.ray_node_id,
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            timestamp_s=time.time(),
            kv_bytes_per_token=cache.tensor[:, :, 0, 0].numel() * cache.tensor.element_size(),
            prefill_tokens_per_s=loop.tokens_computed / loop.busy_s if loop.busy_s > 1 else 0.0,
            **loop.load,
        )

    # ------------------------------------------------------------------ persistence
    def _drain_persist(self, engine: EngineCore) -> None:
        """Engine thread, after each step: hand full blocks to the event loop, never wait."""
        blocks = engine.drain_persist()
        if blocks and self._event_loop is not None:
            self._event_loop.call_soon_threadsafe(self._queue_persist, blocks)

    def _queue_persist(self, blocks: list[tuple[bytes, torch.Tensor]]) -> None:
        if self._persist_queue.qsize() >= MAX_PERSIST_BATCHES:
            # NOTE: back-pressure: the store cannot keep up; memory stays bounded and the
            # blocks are recomputed if a later turn needs them.
            self.num_persist_dropped += len(blocks)
            return
        self._persist_queue.put_nowait(blocks)

    async def _persist_forever(self) -> None:
        assert self.persist is not None
        while True:
            batch = await self._persist_queue.get()
            while not self._persist_queue.empty():  # coalesce what piled up meanwhile
                batch += self._persist_queue.get_nowait()
            try:
                await self.persist(batch)
                self.num_persisted_blocks += len(batch)
            except Exception:  # persistence is best effort: serving goes on
                logger.warning("persisting %d KV blocks failed", len(batch), exc_info=True)

    async def _report_once(self) -> None:
        assert self._reporter is not None
        await self._reporter(self.load_report(), self.mover.stats)

    async def _report_forever(self) -> None:
        while True:
            await asyncio.sleep(self._report_interval_s)
            try:
                await self._report_once()
            except Exception:  # the Scheduler restarting must not kill the engine
                logger.warning("load report failed", exc_info=True)
