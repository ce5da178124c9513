"""Scheduler deployment: holds the ClusterView, answers plan(). One replica per app."""

from __future__ import annotations

import time

from deployments.protocol import LoadReport, Plan, PlanRequest
from deployments.scheduler.policy import plan_and_note
from deployments.scheduler.view import ClusterView


class Scheduler:
    def __init__(self, stale_after_s: float = 15.0):
        self.view = ClusterView(stale_after_s)

    async def report(self, report: LoadReport) -> None:
        self.view.update(report)

    async def forget(self, replica_id: str) -> None:
        self.view.remove(replica_id)

    async def plan(self, request: PlanRequest) -> Plan:
        return plan_and_note(request, self.view, time.time())

    async def engines(self) -> list[LoadReport]:
        return self.view.snapshot()
