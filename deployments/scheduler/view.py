"""ClusterView: the Scheduler's picture of every engine replica, built from LoadReports.

Pure (no Ray, no clock of its own): callers pass `now`. Between reports the view adds what
the Scheduler itself planned, so a burst of requests is spread instead of piling onto the
replica that looked idlest at the last report.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from deployments.protocol import LoadReport, Role


@dataclass(slots=True)
class EngineState:
    report: LoadReport
    planned_tokens: int = 0  # planned since the report (prefill work, or decode KV tokens)
    planned_requests: int = 0

    @property
    def queued_tokens(self) -> int:
        return self.report.num_queued_tokens + self.planned_tokens

    @property
    def running(self) -> int:
        return self.report.num_running + self.report.num_waiting + self.planned_requests

    @property
    def free_blocks(self) -> int:
        blocks = -(-self.planned_tokens // self.report.block_size)
        return self.report.num_free_blocks - blocks


class ClusterView:
    def __init__(self, stale_after_s: float = 15.0):
        self.stale_after_s = stale_after_s
        self.engines: dict[str, EngineState] = {}

    def update(self, report: LoadReport) -> None:
        self.engines[report.replica_id] = EngineState(report)

    def remove(self, replica_id: str) -> None:
        self.engines.pop(replica_id, None)

    def live(self, role: Role, now: float) -> list[EngineState]:
        return [
            e
            for e in self.engines.values()
            if e.report.role == role and now - e.report.timestamp_s <= self.stale_after_s
        ]

    def note_planned(self, replica_id: str, num_tokens: int) -> None:
        state = self.engines.get(replica_id)
        if state is not None:
            state.planned_tokens += num_tokens
            state.planned_requests += 1

    def snapshot(self) -> list[LoadReport]:
        return [replace(e.report) for e in self.engines.values()]
