"""`python -m ops sim <scenario.yaml>`: run one scenario (or a sweep) with a progress bar.

    python -m ops sim ops/sim/scenarios/ds660b-2p4d.yaml         one scenario
    python -m ops sim ops/sim/scenarios/sweep-scale.yaml         a sweep: one PNG for it
    python -m ops sim ops/sim/scenarios/x.yaml --no-online --set trace.agents=256
    python -m ops sim calibrate [--fit-host]                     fit + one-machine check

Writes bench-results/sim-<name>.json and .png (the sweep's name for a sweep).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

logger = logging.getLogger(__name__)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sim", help="cluster simulator running the live scheduler policy")
    p.add_argument("scenario", help="scenario YAML (ops/sim/scenarios/), or 'calibrate'")
    p.add_argument("--no-online", action="store_true", help="skip the online rate search")
    p.add_argument("--no-offline", action="store_true", help="skip the offline JCT runs")
    p.add_argument("--points", default="", help="sweep: only these point labels (a,b)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. trace.agents=256 (YAML value)",
    )
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.add_argument("--fit-host", action="store_true", help="calibrate: grid-fit the host")
    p.set_defaults(func=_cmd_sim)


def _override(scenario: Any, sets: list[str], no_online: bool, no_offline: bool) -> Any:
    data = scenario.model_dump()
    for item in sets:
        key, _, raw = item.partition("=")
        target = data
        *parents, leaf = key.split(".")
        for part in parents:
            target = target.setdefault(part, {}) if target.get(part) is not None else {}
        target[leaf] = yaml.safe_load(raw)
    if no_online:
        data["online"] = None
    if no_offline:
        data["offline"] = False
    return type(scenario).model_validate(data)


def _cmd_sim(args: argparse.Namespace) -> int:
    if args.scenario == "calibrate":
        return _calibrate(args)
    import time

    from ops.sim.config import load_scenarios
    from ops.sim.report import plot_scenario, plot_sweep, print_table, write_results
    from ops.sim.runner import num_runs, run_scenario

    cpu_start = time.process_time()

    scenarios, sweep = load_scenarios(args.scenario)
    if args.points:
        wanted = set(args.points.split(","))
        scenarios = [s for s in scenarios if s.label in wanted]
    scenarios = [_override(s, args.set, args.no_online, args.no_offline) for s in scenarios]
    name = sweep.name if sweep else scenarios[0].name
    rows: list[dict[str, Any]] = []
    with tqdm(total=sum(num_runs(s) for s in scenarios), desc=name, unit="run") as bar:
        for scenario in scenarios:
            bar.set_postfix_str(scenario.label or scenario.name)
            rows += run_scenario(scenario, lambda: bar.update(1))
    for row in rows:
        row["point"] = row["point"] or row["scenario"]
    print_table(name, rows)
    meta = {
        "cpu_s": round(time.process_time() - cpu_start, 1),
        "scenario_file": str(args.scenario),
        "overrides": args.set,
        "scenarios": [s.model_dump(mode="json") for s in scenarios],
    }
    path = write_results(name, rows, meta, args.out)
    title = f"{name}: {scenarios[0].description}" + (f" ({len(scenarios)} points)" if sweep else "")
    plot = plot_sweep if sweep else plot_scenario
    plot(rows, path.with_suffix(".png"), title)
    logger.info(
        "wrote results",
        extra={"json": str(path), "png": str(path.with_suffix(".png")), "cpu_s": meta["cpu_s"]},
    )
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from ops.sim.calibration import calibration_rows, fit
    from ops.sim.config import load_scenarios
    from ops.sim.report import write_results
    from ops.sim.validate import fit_host, validate

    console = Console(width=200)
    fit_rows = calibration_rows()
    table = Table(title="performance model vs the engine measurements it was fitted to")
    for col in ("point", "threads", "fitted", "measured_s", "predicted_s", "error"):
        table.add_column(col, justify="left" if col == "point" else "right")
    for r in fit_rows:
        table.add_row(
            r["point"],
            str(r["threads"]),
            "yes" if r["fitted"] else "held out",
            f"{r['measured_s']:.4g}",
            f"{r['predicted_s']:.4g}",
            f"{r['error']:+.1%}",
        )
    console.print(table)
    scenario = load_scenarios(Path(__file__).with_name("scenarios") / "one-machine.yaml")[0][0]
    grid: list[dict[str, Any]] = []
    if args.fit_host:
        with console.status("fitting the host (grid search, ~1 min)"):
            grid = fit_host(scenario)
        console.print({"best": grid[0], "next": grid[1:4]})
    from ops.sim.validate import with_host

    # the baseline: the engine fit alone, no host contention, KV moved at the memcpy rate
    engine_only = with_host(scenario, 0.0, fit().host_copy_bytes_per_s)
    rows = [{"host": "fitted", **r} for r in validate(scenario)]
    rows += [{"host": "none (engine bench only)", **r} for r in validate(engine_only)]
    table = Table(title="one-machine benchmark: simulated vs measured (offline JCT held out)")
    columns = (
        "host",
        "mode",
        "jct_measured_s",
        "jct_sim_s",
        "jct_error",
        "ttft_p50_measured_s",
        "ttft_p50_sim_s",
        "tpot_p50_measured_ms",
        "tpot_p50_sim_ms",
        "hit_rate_sim",
        "snic_max_avg_sim",
        "read_paths_sim",
    )
    for col in columns:
        left = col in ("host", "mode", "read_paths_sim")
        table.add_column(col, justify="left" if left else "right")
    for r in rows:
        table.add_row(*[f"{r[c]:+.1%}" if c == "jct_error" else str(r[c]) for c in columns])
    console.print(table)
    meta = {"host": scenario.cluster.model_dump(), "engine_fit": fit_rows, "host_grid": grid}
    path = write_results("calibration", rows, meta, args.out)
    console.print(f"wrote {path}")
    return 0
