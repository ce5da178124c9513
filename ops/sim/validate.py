"""Does the simulator predict the real one-machine benchmark? And the host-contention fit.

validate(scenario)  the one-machine scenario (scenarios/one-machine.yaml) per mode against
                    bench-results/agentic.json's offline JCT (copied into
                    calibration.yaml `benchmark`): the held-out check of the simulator.
fit_host(scenario)  the two constants of the shared 2-core host that the engine
                    benchmark cannot give: `background_threads` (always-runnable
                    threads of the rest of the app) and `kv_plumbing_bytes_per_s` (host
                    CPU per KV byte moved outside the engines). A grid search minimising
                    the log error over the benchmark's observables *other than the
                    offline JCTs*: the online run's JCTs (bench-results/agentic-
                    online.json) and every run's TPOT p50. The offline JCTs stay held out.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

from ops.sim.calibration import load_measurements
from ops.sim.config import Scenario
from ops.sim.metrics import summarize
from ops.sim.runner import check_conservation, run_once

ONLINE_RESULTS = Path(__file__).parents[2] / "bench-results/agentic-online.json"
MODES = [
    ("single_path", "single_path", False),
    ("dualpath", "dualpath", False),
    ("dualpath_split", "dualpath_split", False),
    ("oracle", "dualpath", True),
]


def with_host(scenario: Scenario, background_threads: float, plumbing: float) -> Scenario:
    cluster = scenario.cluster.model_copy(
        update={"background_threads": background_threads, "kv_plumbing_bytes_per_s": plumbing}
    )
    return scenario.model_copy(update={"cluster": cluster})


def validate(scenario: Scenario) -> list[dict[str, Any]]:
    """Simulated vs measured, per mode of the one-machine benchmark."""
    bench = load_measurements()["benchmark"]
    rows = []
    for label, policy, oracle in MODES:
        result = run_once(scenario, policy, oracle)
        check_conservation(result)
        sim = summarize(result)
        measured = bench["jct_s"][label]
        rows.append(
            {
                "mode": label,
                "jct_measured_s": measured,
                "jct_sim_s": sim["jct_s"],
                "jct_error": round(sim["jct_s"] / measured - 1, 3),
                "ttft_p50_measured_s": round(bench["ttft_p50_ms"][label] / 1e3, 2),
                "ttft_p50_sim_s": sim["ttft_p50_s"],
                "tpot_p50_measured_ms": bench["tpot_p50_ms"][label],
                "tpot_p50_sim_ms": sim["tpot_p50_ms"],
                "hit_rate_measured": bench["hit_rate"][label],
                "hit_rate_sim": sim["hit_rate"],
                "snic_max_avg_measured": bench["snic_max_avg"][label],
                "snic_max_avg_sim": sim["snic_max_avg"],
                "read_paths_sim": sim["read_paths"],
            }
        )
    return rows


def _online_targets() -> list[tuple[str, float, float, float]]:
    """(policy, rate, JCT, TPOT p50 ms) of the measured online runs."""
    data = json.loads(ONLINE_RESULTS.read_text())
    return [
        (r["mode"], float(r["load"].split()[1].removesuffix("/s")), r["jct_s"], r["tpot_p50_ms"])
        for r in data["rows"]
    ]


def host_error(scenario: Scenario) -> tuple[float, list[float]]:
    """(log-RMS error over the fitting observables, offline JCT errors) of one setting."""
    bench = load_measurements()["benchmark"]
    logs: list[float] = []
    for policy, rate, jct, tpot in _online_targets():
        sim = summarize(run_once(scenario, policy, False, rate))
        logs += [math.log(sim["jct_s"] / jct), math.log(sim["tpot_p50_ms"] / tpot)]
    held_out = []
    for label, policy, oracle in MODES:
        sim = summarize(run_once(scenario, policy, oracle))
        logs.append(math.log(sim["tpot_p50_ms"] / bench["tpot_p50_ms"][label]))
        held_out.append(round(sim["jct_s"] / bench["jct_s"][label] - 1, 3))
    return math.sqrt(sum(x * x for x in logs) / len(logs)), held_out


def fit_host(
    scenario: Scenario,
    threads: tuple[float, ...] = (1.5, 2.0, 2.5, 3.0, 3.5),
    plumbing: tuple[float, ...] = (3.54e9, 2e9, 1e9, 0.5e9, 0.25e9),
) -> list[dict[str, Any]]:
    """Every grid point's fitting error (and, for the record, its held-out JCT errors)."""
    rows = []
    for k, rate in itertools.product(threads, plumbing):
        err, held_out = host_error(with_host(scenario, k, rate))
        rows.append(
            {
                "background_threads": k,
                "kv_plumbing_bytes_per_s": rate,
                "fit_log_rms": round(err, 4),
                "offline_jct_errors": held_out,
            }
        )
    return sorted(rows, key=lambda r: r["fit_log_rms"])
