"""TrafficManager deployment: one per (logical) node; engines report their transfers to it."""

from __future__ import annotations

import ray

from deployments.protocol import TransferReport
from deployments.traffic.manager import TrafficManager as _TrafficManager


class TrafficManager:
    def __init__(self) -> None:
        self.manager = _TrafficManager(ray.get_runtime_context().get_node_id())

    async def record(self, report: TransferReport) -> None:
        self.manager.record(report.stats)

    async def stats(self) -> dict[str, object]:
        return self.manager.stats()
