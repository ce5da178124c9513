"""Simulator output: a rich table, bench-results/sim-<name>.json and a PNG per scenario/sweep.

No torch here (ops/bench/_report.py imports it for machine facts): the simulator's tables
and files follow the same layout, written by this lighter module.
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

RESULTS_DIR = Path("bench-results")
COLUMNS = [
    "point",
    "mode",
    "jct_s",
    "jct_speedup",
    "ttft_mean_s",
    "ttft_p90_s",
    "tpot_mean_ms",
    "snic_max_avg",
    "snic_max_avg_1s",
    "pe_busy",
    "de_wait_mean_s",
    "forgotten_frac",
    "max_rate",
    "rate_speedup",
    "online_rate",
    "online_ok",
    "online_ttft_s",
    "online_tpot_ms",
    "wall_s",
]
MODE_COLORS = {
    "single_path": "tab:red",
    "dualpath": "tab:blue",
    "dualpath_split": "tab:green",
    "round_robin": "tab:purple",
    "oracle": "tab:gray",
}


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def print_table(title: str, rows: list[dict[str, Any]]) -> None:
    columns = [c for c in COLUMNS if any(c in r for r in rows)]
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col in ("point", "mode") else "right")
    for row in rows:
        table.add_row(*[_fmt(row.get(c)) for c in columns])
    Console(width=200).print(table)


def write_results(
    name: str, rows: list[dict[str, Any]], meta: dict[str, Any], out_dir: Path = RESULTS_DIR
) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "python": platform.python_version(),
        "command": " ".join(sys.argv),
        **meta,
    }
    path = out_dir / f"sim-{name}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str) + "\n")
    return path


def plot_scenario(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Bars per mode: offline JCT, online max rate, and SNIC traffic per node."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    modes = [r["mode"] for r in rows]
    colors = [MODE_COLORS.get(m, "tab:orange") for m in modes]
    axes[0].bar(modes, [r.get("jct_s") or 0 for r in rows], color=colors)
    axes[0].set_ylabel("offline JCT (s)")
    axes[0].set_title("JCT (lower is better)")
    axes[1].bar(modes, [r.get("max_rate") or 0 for r in rows], color=colors)
    axes[1].set_ylabel("agents / s within SLO")
    axes[1].set_title("Online max arrival rate")
    nodes = sorted({n for r in rows for n in (r.get("snic_bytes") or {})})
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        xs = [j + i * width for j in range(len(nodes))]
        ys = [(r.get("snic_bytes") or {}).get(n, 0) / 1e9 for n in nodes]
        axes[2].bar(xs, ys, width, label=r["mode"], color=colors[i])
    axes[2].set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(nodes))], nodes)
    axes[2].set_ylabel("SNIC traffic (GB, read + write)")
    axes[2].set_title("Storage NIC load per node")
    axes[2].legend(fontsize=8)
    for ax in axes[:2]:
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Lines per mode over the sweep's points: JCT, online rate or latency, SNIC max/avg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = list(dict.fromkeys(r["point"] for r in rows))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    panels = [
        ("jct_s", "offline JCT (s)"),
        ("max_rate", "online max agents/s within SLO"),
        ("online_ttft_s", "online mean TTFT at the fixed rate (s)"),
        ("online_tpot_ms", "online mean TPOT at the fixed rate (ms)"),
        ("snic_max_avg", "SNIC max/avg (whole run)"),
    ]
    fixed = any(r.get("online_rate") for r in rows)
    panels = [
        p
        for p in panels
        if any(r.get(p[0]) is not None for r in rows)
        and (fixed or p[0] not in ("online_ttft_s", "online_tpot_ms"))
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        for mode in modes:
            by_point = {r["point"]: r.get(key) for r in rows if r["mode"] == mode}
            ys = [by_point.get(p) for p in points]
            ys = [math.nan if y is None else y for y in ys]
            ax.plot(range(len(points)), ys, marker="o", label=mode, color=MODE_COLORS.get(mode))
        ax.set_xticks(range(len(points)), points)  # positions: labels like "2P4D" are not dates
        ax.set_ylabel(label)
        ax.set_xlabel("setup")
        ax.tick_params(axis="x", labelrotation=20)
        if _spans_decade(rows, key):
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _spans_decade(rows: list[dict[str, Any]], key: str) -> bool:
    values = [r[key] for r in rows if r.get(key)]
    return bool(values) and max(values) / min(values) > 10
