"""What the Scheduler planned, counted per read path and per node (`ops status`, the
benchmarks, the cluster tests compare it with what each SNIC really read). Pure."""

from __future__ import annotations

from collections import Counter

from deployments.protocol import Plan
from deployments.scheduler.policy import snic_reads
from deployments.scheduler.view import ClusterView


class PlanCounters:
    def __init__(self) -> None:
        self.read_paths: Counter[str] = Counter()
        self.read_blocks: Counter[str] = Counter()  # node -> hit blocks planned to read there
        self.snic_blocks: Counter[str] = Counter()  # node -> of them, through its own SNIC
        self.pulled_blocks: Counter[str] = Counter()  # node -> blocks pulled from its DRAM

    def add(self, plan: Plan, keys: tuple[bytes, ...], view: ClusterView) -> None:
        self.read_paths[plan.read_path] += 1
        sides = ((plan.prefill_node, plan.pe_read_blocks), (plan.decode_node, plan.num_de_blocks))
        for node, blocks in sides:
            if blocks:
                self.read_blocks[node] += blocks
        for node, blocks in snic_reads(plan, keys, view):
            if blocks:
                self.snic_blocks[node] += blocks
        for start, end, source in plan.pulls:
            self.pulled_blocks[source] += end - start

    def stats(self) -> dict[str, dict[str, int]]:
        return {
            "read_paths": dict(self.read_paths),
            "read_blocks": dict(self.read_blocks),
            "snic_blocks": dict(self.snic_blocks),
            "pulled_blocks": dict(self.pulled_blocks),
        }
