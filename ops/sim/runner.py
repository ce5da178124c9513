"""Run scenarios: each policy offline (JCT) and online (max agent arrival rate within the SLO).

    run_once(scenario, policy, ...)   one simulated replay -> RunResult
    online_max_rate(scenario, policy) bisection (log scale) over agent arrival rates: the
                                      highest rate whose scored turns meet TTFT / TPOT
    run_scenario(scenario, bar)       every policy of the scenario -> rows (one per policy)

Online with windows: an agent replays `window_turns` turns instead of its whole trajectory,
so agents are made to arrive `full turns / window turns` times faster; turns per second,
and so the load and the number of agents in flight, are those of whole trajectories at the
stated rate (full-trajectory agents per second, the paper's APS).
"""

from __future__ import annotations

import logging
import math
import random
import statistics
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from ops.sim.cluster import SimCluster
from ops.sim.config import Scenario
from ops.sim.metrics import RunResult, stat, summarize
from ops.sim.traces import (
    PAPER_TRACES,
    SimAgent,
    make_sim_agents,
    make_trace,
    sim_agents_from_trace,
)

logger = logging.getLogger(__name__)
BENCH_VOCAB = 49_152  # SmolLM2's vocabulary: make_trace's ids, as the benchmark draws them


def build_agents(scenario: Scenario, rate: float | None = None) -> list[SimAgent]:
    """The scenario's agents; with `rate` (agents/s), Poisson start times over the online
    duration (the one-machine benchmark's trace keeps its agents and draws like it)."""
    t = scenario.trace
    if t.preset == "bench":
        args = SimpleNamespace(
            seed=t.seed,
            agents=t.agents,
            turns=t.turns,
            context=t.context,
            append=t.append,
            gen=t.gen,
        )
        agents = sim_agents_from_trace(make_trace(args, BENCH_VOCAB))
        if rate is not None:  # ops/bench/agentic.py: first agent at 0, then exponential gaps
            rng, start = random.Random(t.seed + 1), 0.0
            for agent in agents:
                agent.start_s = start
                start += rng.expovariate(rate)
        return agents
    shape = PAPER_TRACES[t.preset]
    if rate is None:
        return make_sim_agents(shape, t.agents, t.seed, t.window_turns)
    assert scenario.online is not None
    probe = make_sim_agents(shape, 256, t.seed + 7, t.window_turns)
    speedup = statistics.fmean(a.full_turns for a in probe) / statistics.fmean(
        a.num_turns for a in probe
    )
    rng = random.Random(t.seed + 1)
    starts: list[float] = []
    clock = rng.expovariate(rate * speedup)
    while clock < scenario.online.duration_s:
        starts.append(clock)
        clock += rng.expovariate(rate * speedup)
    agents = make_sim_agents(shape, len(starts), t.seed, t.window_turns)
    for agent, start in zip(agents, starts, strict=True):
        agent.start_s = start
    return agents


def run_once(
    scenario: Scenario, policy: str, oracle: bool = False, rate: float | None = None
) -> RunResult:
    if rate is not None and scenario.trace.warmup_turns:  # online: every turn counts
        trace = scenario.trace.model_copy(update={"warmup_turns": 0})
        scenario = scenario.model_copy(update={"trace": trace})
    agents = build_agents(scenario, rate)
    until = math.inf
    if rate is not None and scenario.trace.preset != "bench":
        assert scenario.online is not None
        until = scenario.online.duration_s * 2.0  # an overloaded run stops here
    result = SimCluster(scenario, policy, oracle).run(agents, until)
    result.extra["rate"] = rate
    return result


def slo_check(scenario: Scenario, result: RunResult) -> dict[str, Any]:
    """TTFT / TPOT of the turns that arrived in the scored window, against the SLO."""
    online = scenario.online
    assert online is not None
    scored = [
        r for r in result.records if online.warmup_s <= r.arrival_s <= online.duration_s and r.timed
    ]
    unfinished = [r for r in scored if math.isnan(r.finish_s)]
    done = [r for r in scored if not math.isnan(r.finish_s)]
    ttft = stat([r.ttft_s for r in done], online.statistic)
    tpot = stat([t for r in done if (t := r.tpot_s) is not None], online.statistic)
    ok = (
        bool(done)
        and not unfinished
        and ttft <= online.slo_ttft_s
        and tpot * 1e3 <= online.slo_tpot_ms
    )
    return {
        "ok": ok,
        "ttft_s": ttft,
        "tpot_ms": tpot * 1e3,
        "scored": len(scored),
        "unfinished": len(unfinished),
    }


def online_max_rate(
    scenario: Scenario,
    policy: str,
    oracle: bool = False,
    on_probe: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """The highest agent rate (agents/s) within the SLO, by bisection on a log scale."""
    online = scenario.online
    assert online is not None
    lo, hi = online.rate_lo, online.rate_hi
    best: dict[str, Any] | None = None
    probes: list[dict[str, Any]] = []

    def probe(rate: float) -> bool:
        nonlocal best
        check = slo_check(scenario, run_once(scenario, policy, oracle, rate))
        probes.append({"rate": round(rate, 4), **check})
        on_probe()
        if check["ok"] and (best is None or rate > best["rate"]):
            best = {"rate": rate, **check}
        return check["ok"]

    if not probe(lo):
        for _ in range(online.probes - 1):  # keep the bar honest: these probes are skipped
            on_probe()
        return {"max_rate": 0.0, "at": None, "probes": probes}
    if probe(hi):
        for _ in range(online.probes - 2):
            on_probe()
        return {"max_rate": hi, "at": best, "probes": probes}
    for _ in range(online.probes - 2):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if probe(mid) else (lo, mid)
    return {"max_rate": round(lo, 4), "at": best, "probes": probes}


def _modes(scenario: Scenario) -> list[tuple[str, str, bool]]:
    """(label, policy, oracle) for every run the scenario asks for."""
    modes = [(name, name, False) for name in scenario.policy.names]
    if scenario.policy.oracle:
        modes.append(("oracle", "dualpath", True))
    return modes


def num_runs(scenario: Scenario) -> int:
    modes = _modes(scenario)
    online = sum(1 for label, _, _ in modes if label != "oracle") if scenario.online else 0
    probes = 0
    if scenario.online is not None:
        probes = 1 if scenario.online.fixed_rate else scenario.online.probes
    return len(modes) * int(scenario.offline) + online * probes


def run_scenario(scenario: Scenario, advance: Callable[[], None] = lambda: None) -> list[dict]:
    """One row per mode: offline summary and/or online max rate; `advance` per sim run."""
    rows: list[dict[str, Any]] = []
    for label, policy, oracle in _modes(scenario):
        row: dict[str, Any] = {"scenario": scenario.name, "point": scenario.label, "mode": label}
        if scenario.offline:
            result = run_once(scenario, policy, oracle)
            check_conservation(result)
            row.update(summarize(result))
            row["mode"] = label
            advance()
        if scenario.online is not None and scenario.online.fixed_rate and not oracle:
            rate = scenario.online.fixed_rate
            check = slo_check(scenario, run_once(scenario, policy, oracle, rate))
            advance()
            row.update(
                {
                    "online_rate": rate,
                    "online_ok": check["ok"],
                    "online_ttft_s": round(check["ttft_s"], 3),
                    "online_tpot_ms": round(check["tpot_ms"], 2),
                }
            )
        elif scenario.online is not None and not oracle:  # the oracle: offline only
            found = online_max_rate(scenario, policy, oracle, advance)
            row["max_rate"] = found["max_rate"]
            at = found["at"] or {}
            row["online_ttft_s"] = round(at.get("ttft_s", math.nan), 3)
            row["online_tpot_ms"] = round(at.get("tpot_ms", math.nan), 2)
            row["online_probes"] = found["probes"]
        logger.info("sim mode done", extra={"scenario": scenario.name, "mode": label})
        rows.append(row)
    single = next((r for r in rows if r["mode"] == "single_path"), None)
    for row in rows:
        if single and row.get("jct_s") and single.get("jct_s"):
            row["jct_speedup"] = round(single["jct_s"] / row["jct_s"], 3)
        if single and single.get("max_rate") and "max_rate" in row:
            row["rate_speedup"] = round(row["max_rate"] / single["max_rate"], 3)
    return rows


def check_conservation(result: RunResult) -> None:
    """Every turn finished exactly once; the SNICs read exactly the hit KV that was planned;
    the reports retired all the work the view planned.

    Raises:
        AssertionError: a violation (a simulator bug).
    """
    bad = [r for r in result.records if r.num_finishes != 1]
    assert not bad, f"{len(bad)} turns finished {sorted({r.num_finishes for r in bad})} times"
    read = sum(n.bytes_read for n in result.nodes)
    assert read == result.bytes_hit_needed, f"read {read} B, hits need {result.bytes_hit_needed}"
    left = result.extra.get("planned_left", 0)
    assert not left, f"{left} planned entries no report retired (they would wait for the TTL)"
