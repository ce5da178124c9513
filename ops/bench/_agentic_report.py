"""The agentic bench's report: what each layout ran (as the report states it), the table's
columns, `vs_single` per layout and load, the highest online rate within the SLO, the meta
block and the plots. Pure apart from matplotlib; ops/bench/agentic.py runs the replay."""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ops.bench._report import machine_info

NODES = ("pnode", "dnode0", "dnode1")
KV_COUNTERS = (
    "read_timeouts",
    "blocks_from_write_buffer",
    "blocks_pulled",
    "corrupt_or_missing",
    "persist_dropped",
)
LAYOUT = (  # what _deploy runs, as every report states it
    "one machine emulating 3 logical nodes: pnode (1 PE), dnode0 and dnode1 (1 DE each), one "
    "thread per engine (int4 weights, bf16 KV, ngram drafts unless --app-args says otherwise); "
    "every node's SNIC capped at {snic_mbps} MB/s (oracle: uncapped); KV store without DRAM "
    "cache, NVMe tier in a temp directory"
)
CLUSTER_LAYOUT = (
    "a real Ray cluster on this machine (ops.cluster): a head (0 CPUs: Serve controller, HTTP "
    "proxy, Ingress, Scheduler) and one raylet per node, pnode (1 PE), dnode0 and dnode1 "
    "(1 DE each), 1 CPU and its own object store each, the nodes pinned by custom resources; "
    "otherwise as emulated: one thread per engine, every node's SNIC capped at {snic_mbps} "
    "MB/s (oracle: uncapped), KV store without DRAM cache, one NVMe directory shared by all"
)
LAYOUTS = {  # --layout -> the rows' `layout` column
    "emulated": "emulated: 1 Ray node",
    "cluster": f"cluster: {len(NODES) + 1} Ray nodes (head + {len(NODES)})",
}
LAYOUT_TEXT = {"emulated": LAYOUT, "cluster": CLUSTER_LAYOUT}
COLUMNS = [
    "mode",
    "layout",
    "load",
    "jct_s",
    "vs_single",
    "turns",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "tpot_p50_ms",
    "queue_ms",
    "sched_ms",
    "read_ms",
    "prefill_ms",
    "hit_rate",
    "snic_max_avg",
    "read_paths",
    "pulled_blocks",
    "slo_ok",
]


def add_vs_single(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set `vs_single` (single_path's JCT / the row's JCT) on every row, in place, against
    single_path of the same layout and load; None where that did not run."""
    single = {(r.get("layout"), r["load"]): r["jct_s"] for r in rows if r["mode"] == "single_path"}
    for r in rows:
        base = single.get((r.get("layout"), r["load"]))
        r["vs_single"] = round(base / r["jct_s"], 2) if base and r["jct_s"] else None
    return rows


def max_online_rates(rows: list[dict[str, Any]], modes: list[str]) -> dict[str, float | None]:
    """Per mode, the highest online arrival rate whose row met the SLO (None: none did)."""
    return {
        mode: max(
            (
                float(r["load"].split()[1].removesuffix("/s"))
                for r in rows
                if r["mode"] == mode and r["load"].startswith("online") and r["slo_ok"]
            ),
            default=None,
        )
        for mode in modes
    }


def layouts_of(layout: str) -> list[str]:
    """The layouts one --layout value runs, in order."""
    return list(LAYOUTS) if layout == "both" else [layout]


def report_meta(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    failures: list[dict[str, str]],
    hit: dict[str, Any] | None,
) -> dict[str, Any]:
    """The report's meta: the machine, the args, which layouts ran (`layouts`, label ->
    description; `layout`, their description as one string), the trace, the SLO and the
    highest online rate within it per mode (the first layout's, as before --layout, and
    per layout)."""
    ran = [k for k in layouts_of(args.layout) if any(r["layout"] == LAYOUTS[k] for r in rows)]
    described = {LAYOUTS[k]: LAYOUT_TEXT[k].format(snic_mbps=args.snic_mbps) for k in ran}
    modes = args.modes.split(",")
    by_layout = {
        label: max_online_rates([r for r in rows if r["layout"] == label], modes)
        for label in described
    }
    return {
        **machine_info(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "layout": " | ".join(f"{k}: {v}" for k, v in described.items())
        if len(described) > 1
        else "".join(described.values()),
        "layouts": described,
        "layout_failures": failures,
        "trace": (
            f"{args.agents} agents x {args.turns} turns, {args.context} context tokens, "
            f"~{args.append} appended and ~{args.gen} generated per turn, JCT after "
            f"{args.warmup_turns} untimed warm-up turn(s) (paper 64K-class: "
            "157 turns, 429 appended, 176 generated, 32.7k context; scaled to 2 CPU cores)"
        ),
        "kv_hit_ttft": hit,
        "slo": f"warm-turn TTFT p90 <= {args.slo_ttft_s} s and TPOT p90 <= {args.slo_tpot_ms} ms"
        " (the paper's 4 s / 50 ms scaled to this CPU machine)",
        "max_online_rate_within_slo": next(iter(by_layout.values()), {}),
        "max_online_rate_within_slo_by_layout": by_layout,
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    offline = [r for r in rows if r["load"] == "offline"]
    layouts = list(dict.fromkeys(r["layout"] for r in offline))
    if len(layouts) > 1:
        _plot_layouts(offline, layouts, path)
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.bar([r["mode"] for r in offline], [r["jct_s"] for r in offline], color="tab:blue")
    ax1.set_ylabel("offline JCT (s)")
    ax1.set_title("Job completion time (lower is better)")
    width = 0.8 / max(1, len(offline))
    for i, r in enumerate(offline):
        xs = [j + i * width for j in range(len(NODES))]
        ax2.bar(xs, [r["snic_bytes"][n] / 1e6 for n in NODES], width, label=r["mode"])
    ax2.set_xticks([j + width * (len(offline) - 1) / 2 for j in range(len(NODES))], NODES)
    ax2.set_ylabel("SNIC traffic (MB, read + write)")
    ax2.set_title("Storage NIC load per node")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_layouts(offline: list[dict[str, Any]], layouts: list[str], path: Path) -> None:
    """Both layouts side by side: per mode, one bar per layout, for JCT, SNIC balance and
    the blocks pulled from other nodes' DRAM."""
    import matplotlib.pyplot as plt

    modes = list(dict.fromkeys(r["mode"] for r in offline))
    by = {(r["layout"], r["mode"]): r for r in offline}
    panels = (
        ("jct_s", "offline JCT (s)", "Job completion time (lower is better)"),
        ("snic_max_avg", "SNIC traffic max / mean", "SNIC balance (lower is better)"),
        ("pulled_blocks", "blocks pulled from DRAM", "Cross-node DRAM pulls (planned)"),
    )
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.5))
    width = 0.8 / len(layouts)
    for ax, (key, label, title) in zip(axes, panels, strict=True):
        for i, layout in enumerate(layouts):
            xs = [j + i * width for j in range(len(modes))]
            values = [(by.get((layout, m)) or {}).get(key) or 0 for m in modes]
            ax.bar(xs, values, width, label=layout)
        ax.set_xticks([j + width * (len(layouts) - 1) / 2 for j in range(len(modes))], modes)
        ax.tick_params(axis="x", labelsize=8, labelrotation=20)
        ax.set_ylabel(label)
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@dataclass
class TurnRecord:
    agent: int
    turn: int
    prompt_tokens: int
    cached_tokens: int
    ttft_s: float
    tpot_s: float | None
    timings: dict[str, float] = field(default_factory=dict)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else 0.0


def summarize(
    mode: str,
    load: str,
    jct: float,
    records: list[TurnRecord],
    nodes,
    sched,
    layout: str = "emulated",
) -> dict:
    warm = [r for r in records if r.turn > 0]  # turn 0 is cold by construction
    snic = {n: s["snic"] or {} for n, s in nodes.items()}
    traffic = [
        s.get("bytes_read_total", 0) + s.get("bytes_written_total", 0) for s in snic.values()
    ]
    mean = statistics.mean(traffic) if traffic else 0
    timing = lambda k: statistics.median(r.timings.get(k, 0.0) for r in warm) if warm else 0.0  # noqa: E731
    return {
        "mode": mode,
        "layout": LAYOUTS[layout],
        "load": load,
        "jct_s": round(jct, 2),
        "turns": len(records),
        "ttft_p50_ms": round(pct([r.ttft_s for r in warm], 0.5) * 1e3, 1),
        "ttft_p99_ms": round(pct([r.ttft_s for r in warm], 0.99) * 1e3, 1),
        "tpot_p50_ms": round(pct([r.tpot_s for r in records if r.tpot_s], 0.5) * 1e3, 1),
        "queue_ms": round(timing("queue_ms"), 1),  # admission wait
        "sched_ms": round(timing("schedule_ms"), 1),
        "read_ms": round(timing("kv_read_ms"), 1),
        "prefill_ms": round(timing("prefill_ms"), 1),
        "hit_rate": round(
            sum(r.cached_tokens for r in warm) / max(1, sum(r.prompt_tokens for r in warm)), 3
        ),
        "snic_max_avg": round(max(traffic) / mean, 2) if mean else None,
        "read_paths": ",".join(f"{k}:{v}" for k, v in sorted(sched["read_paths"].items())),
        "snic_bytes": {n: t for n, t in zip(nodes, traffic, strict=True)},
        "read_blocks": sched.get("read_blocks", {}),  # planned per node
        "pulled_blocks": sum(sched.get("pulled_blocks", {}).values()),  # planned DRAM pulls
        "pulled_from": sched.get("pulled_blocks", {}),  # per source node
        "snic_blocks": sched.get("snic_blocks", {}),  # planned SNIC reads per node
        "kv": {n: {k: (s["kvstore"] or {}).get(k) for k in KV_COUNTERS} for n, s in nodes.items()},
        "snic_read_bytes": {n: s.get("bytes_read_total", 0) for n, s in snic.items()},
    }
