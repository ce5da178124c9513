"""What one simulated run measured: a record per turn, and the run's summary.

The summary names match ops/bench/agentic.py's rows where they mean the same thing (JCT,
TTFT / TPOT percentiles, hit rate, SNIC max/avg of read + written bytes per node, read
paths), so a simulated row and a measured row compare column by column.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class TurnRecord:
    agent_id: int
    turn: int
    arrival_s: float
    prompt_tokens: int
    gen_tokens: int
    request_id: str = ""  # the PlanRequest's: f"{agent_id}-{turn of its trajectory}"
    timed: bool = True  # counted in JCT / latency statistics (not a warm-up turn)
    cold: bool = False  # its agent's first turn: nothing of it can be stored yet
    hit_blocks: int = 0
    num_de_blocks: int = 0
    read_path: str = ""
    prefill_replica: str = ""
    decode_replica: str = ""
    planned_s: float = math.nan
    read_done_s: float = math.nan
    first_token_s: float = math.nan
    handoff_s: float = math.nan  # its KV reached the DE (the DE took it in)
    decode_admit_s: float = math.nan  # the DE admitted it to its batch (blocks + a slot)
    finish_s: float = math.nan
    num_finishes: int = 0  # conservation: exactly 1 at the end of a run

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        if self.gen_tokens <= 1:
            return None
        return (self.finish_s - self.first_token_s) / (self.gen_tokens - 1)


@dataclass(slots=True)
class NodeTraffic:
    node_id: str
    role: str
    bytes_read: int
    bytes_written: int
    busy_s: float
    log: list[tuple[float, float, int]] = field(default_factory=list)  # SNIC ops


def windowed_max_avg(nodes: list[NodeTraffic], window_s: float = 1.0) -> float | None:
    """SNIC traffic max/avg across nodes per `window_s` window, averaged over the windows
    with traffic: the paper's short-window balance measure (§7.5), not the whole run's."""
    bins: dict[int, list[float]] = {}
    for i, node in enumerate(nodes):
        for start, end, nbytes in node.log:
            first, last = int(start // window_s), int(end // window_s)
            span = max(end - start, 1e-12)
            for b in range(first, last + 1):
                overlap = min(end, (b + 1) * window_s) - max(start, b * window_s)
                if overlap > 0 or first == last:
                    per_node = bins.setdefault(b, [0.0] * len(nodes))
                    per_node[i] += nbytes * (overlap / span if first != last else 1.0)
    ratios = [max(v) / statistics.fmean(v) for v in bins.values() if sum(v) > 0]
    return statistics.fmean(ratios) if ratios else None


@dataclass(slots=True)
class RunResult:
    policy: str
    records: list[TurnRecord]
    nodes: list[NodeTraffic]
    jct_s: float
    sim_end_s: float
    bytes_hit_needed: int  # sum over turns of hit blocks x block bytes
    num_events: int
    wall_s: float
    pe_busy_frac: float
    extra: dict[str, Any] = field(default_factory=dict)


def pct(values: list[float], q: float) -> float:
    """The bench's percentile: nearest rank on the sorted values (0 when empty)."""
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def stat(values: list[float], which: str) -> float:
    if not values:
        return 0.0
    if which == "mean":
        return statistics.fmean(values)
    return pct(values, {"p50": 0.5, "p90": 0.9, "p99": 0.99}[which])


def summarize(result: RunResult, warm_only: bool = True) -> dict[str, Any]:
    """One row: latency over timed turns (warm ones, not an agent's first, when
    `warm_only`: the benchmark's convention), and storage traffic."""
    timed = [r for r in result.records if r.timed]
    warm = [r for r in timed if not r.cold] if warm_only else timed
    ttft = [r.ttft_s for r in warm]
    tpot = [t for r in timed if (t := r.tpot_s) is not None]
    traffic = [n.bytes_read + n.bytes_written for n in result.nodes]
    mean_traffic = statistics.fmean(traffic) if traffic else 0.0
    paths: dict[str, int] = {}
    for r in timed:
        paths[r.read_path] = paths.get(r.read_path, 0) + 1
    hit_tokens = sum(min(r.hit_blocks * result.extra["block_size"], r.prompt_tokens) for r in warm)
    # a DE's import queue: from its KV reaching the DE to a batch slot with room for it
    de_wait = [w for r in timed if not math.isnan(w := r.decode_admit_s - r.handoff_s)]
    return {
        "policy": result.policy,
        "jct_s": round(result.jct_s, 2),
        "turns": len(timed),
        "ttft_mean_s": round(stat(ttft, "mean"), 3),
        "ttft_p50_s": round(pct(ttft, 0.5), 3),
        "ttft_p90_s": round(pct(ttft, 0.9), 3),
        "ttft_p99_s": round(pct(ttft, 0.99), 3),
        "tpot_mean_ms": round(stat(tpot, "mean") * 1e3, 2),
        "tpot_p50_ms": round(pct(tpot, 0.5) * 1e3, 2),
        "tpot_p90_ms": round(pct(tpot, 0.9) * 1e3, 2),
        "hit_rate": round(hit_tokens / max(1, sum(r.prompt_tokens for r in warm)), 4),
        "snic_max_avg": round(max(traffic) / mean_traffic, 3) if mean_traffic else None,
        "snic_max_avg_1s": _round(windowed_max_avg(result.nodes)),
        "read_paths": ",".join(f"{k}:{v}" for k, v in sorted(paths.items())),
        "pe_busy": round(result.pe_busy_frac, 3),
        "de_wait_mean_s": round(stat(de_wait, "mean"), 3),
        "de_wait_p90_s": round(pct(de_wait, 0.9), 3),
        "forgotten_frac": _round(result.extra.get("forgotten_frac")),
        "snic_bytes": {n.node_id: n.bytes_read + n.bytes_written for n in result.nodes},
        "events": result.num_events,
        "wall_s": round(result.wall_s, 2),
    }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)
