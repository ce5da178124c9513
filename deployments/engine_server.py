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
from collections.abc import Awaitable, Callable

from deployments.engine_loop import EngineLoop
from deployments.protocol import LoadReport, Role
from deployments.traffic.manager import KVMover, TransferStats
from engine.core import EngineCore

logger = logging.getLogger(__name__)

Reporter = Callable[[LoadReport, TransferStats], Awaitable[None]]


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
    ):
        self.engine = engine
        self.mover = mover
        self.replica_id = replica_id
        self.node_id = node_id
        self.loop = EngineLoop(engine, name=f"{self.role}-engine")
        self._reporter = reporter
        self._report_interval_s = report_interval_s
        self._report_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.loop.start()
        if self._reporter is not None:
            await self._report_once()  # the Scheduler knows us before the first request
            self._report_task = asyncio.create_task(self._report_forever())

    async def close(self) -> None:
        if self._report_task is not None:
            self._report_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._report_task
        await asyncio.to_thread(self.loop.stop)
        self.mover.close()

    def is_healthy(self) -> bool:
        return self.loop.is_alive()

    def load_report(self) -> LoadReport:
        config = self.engine.config
        return LoadReport(
            replica_id=self.replica_id,
            role=self.role,
            node_id=self.node_id,
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            timestamp_s=time.time(),
            **self.loop.load,
        )

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
