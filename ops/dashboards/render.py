"""Render the Grafana board (`dualpath.json`) headless, from a real Prometheus, under load.

    python -m ops dashboard [--minutes 4] [--out docs/dashboard.png]

One run: Ray (its metrics endpoint scraped every 2 s by a local `prometheus` process; Debian:
`apt install prometheus`), the app (1 PE + 1 DE, open API with `max_concurrent: 6` so bursts
are refused), and agentic traffic in all three tiers (sessions whose turns reuse their
context, so KV hits are real) plus a trickle of bad requests. Then every panel's PromQL is
run through Prometheus's `query_range` exactly as Grafana would (`$tier`, `$node` = all) and
drawn in the board's grid. The PNG is a picture of the board's queries on real data, not of
Grafana itself; the series go to `bench-results/dashboard.json` as well.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from engine.config import default_model_dir
from ops.bench._serve import deploy, free_port, serve_session
from ops.replay import Request, replay

logger = logging.getLogger(__name__)
BOARD = Path(__file__).with_name("dualpath.json")
APP = "dualpath-dashboard"
MODEL = "SmolLM2-135M-Instruct"
TIERS = ("priority", "default", "flex")


def start_prometheus(target_port: int, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("prometheus")
    if binary is None:
        raise SystemExit("no `prometheus` binary on PATH (Debian: apt install prometheus)")
    port = free_port()
    config = workdir / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 2s, evaluation_interval: 2s}\n"
        "scrape_configs:\n"
        f"  - job_name: ray\n    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n"
    )
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            process.kill()
            raise RuntimeError("prometheus did not become ready")
        time.sleep(0.5)


def workload(minutes: float, seed: int) -> list[Request]:
    """Agent sessions (3 turns each) arriving over `minutes`, tiers 20/50/30 %."""
    rng = random.Random(seed)
    requests, t, n = [], 0.0, 0
    while t < minutes * 60 - 30:
        tier = rng.choices(TIERS, weights=(2, 5, 3))[0]
        context = rng.randint(256, 768)
        for turn in range(3):
            requests.append(
                Request(
                    t,
                    f"s{n}",
                    context if turn == 0 else 0,
                    rng.randint(8, 24),
                    tier,
                    0 if turn == 0 else rng.randint(32, 96),
                )
            )
        n += 1
        t += rng.expovariate(1 / 6.0)  # a new agent every ~6 s
    return requests


async def bad_requests(base: str, minutes: float) -> None:
    """Unknown models and a malformed body now and then: the rejection panels' data."""
    async with httpx.AsyncClient(timeout=30) as http:
        end = time.time() + minutes * 60
        while time.time() < end:
            await http.post(f"{base}/v1/completions", json={"model": "nope", "prompt": "x"})
            await http.post(f"{base}/v1/completions", content=b"{not json")
            await asyncio.sleep(7)


async def drive(base: str, minutes: float, seed: int) -> None:
    url = f"{base}/v1/completions"
    await asyncio.gather(
        replay(url, MODEL, workload(minutes, seed), 1.0, None, seed), bad_requests(base, minutes)
    )


def query_panels(prom: str, start: float, end: float) -> list[dict[str, Any]]:
    board = json.loads(BOARD.read_text())
    panels = []
    for panel in board["panels"]:
        if panel.get("type") == "row":
            continue
        series = []
        for target in panel.get("targets", []):
            expr = (
                target["expr"]
                .replace("$tier", ".*")
                .replace("$node", ".*")
                .replace("$__range", f"{int(end - start)}s")
            )
            kind = "query" if panel.get("type") == "stat" else "query_range"
            params = {"query": expr, "start": start, "end": end, "step": 5, "time": end}
            data = httpx.get(f"{prom}/api/v1/{kind}", params=params, timeout=30).json()
            if data.get("status") != "success":
                raise RuntimeError(f"{panel['title']}: {data.get('error')} in {expr}")
            for result in data["data"]["result"]:
                labels = result["metric"]
                legend = target.get("legendFormat") or ""
                for key, value in labels.items():
                    legend = legend.replace("{{" + key + "}}", value)
                values = result.get("values") or [result["value"]]
                series.append(
                    {
                        "legend": legend or json.dumps(labels),
                        "t": [float(v[0]) - start for v in values],
                        "y": [float(v[1]) for v in values],
                    }
                )
        panels.append(
            {
                "title": panel["title"],
                "type": panel["type"],
                "unit": panel.get("fieldConfig", {}).get("defaults", {}).get("unit", ""),
                "grid": panel["gridPos"],
                "series": series,
            }
        )
    return panels


def draw(panels: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 6, rows * 3.2), squeeze=False)
    fig.patch.set_facecolor("#111217")
    for ax, panel in zip(axes.flat, panels, strict=False):
        ax.set_facecolor("#181b1f")
        ax.set_title(panel["title"], color="#d8d9da", fontsize=10, loc="left")
        ax.tick_params(colors="#8e8e8e", labelsize=7)
        for spine in ax.spines.values():
            spine.set_color("#2c3235")
        ax.grid(color="#2c3235", linewidth=0.5)
        if panel["type"] == "stat":
            names = [s["legend"] for s in panel["series"]]
            ax.bar(names, [s["y"][-1] for s in panel["series"]], color="#73bf69")
        else:
            for s in panel["series"]:
                finite = [(t, y) for t, y in zip(s["t"], s["y"], strict=True) if y == y]
                if finite:
                    ts, ys = zip(*finite, strict=True)
                    ax.plot(ts, ys, linewidth=1.2, label=s["legend"][:40])
            if panel["series"]:
                ax.legend(fontsize=6, facecolor="#181b1f", labelcolor="#d8d9da", loc="upper left")
        if not panel["series"]:
            ax.text(0.5, 0.5, "no data", color="#8e8e8e", ha="center", transform=ax.transAxes)
        ax.set_xlabel(f"seconds into the run  {panel['unit']}", color="#8e8e8e", fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle(
        "dualpath-serve — ops/dashboards/dualpath.json on live data (Prometheus)", color="#d8d9da"
    )
    fig.tight_layout(rect=(0, 0, 1, 0.975))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80, facecolor=fig.get_facecolor())


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="render the Grafana board from Prometheus under load")
    p.add_argument("--minutes", type=float, default=4.0, help="of load")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs/dashboard.png")
    p.add_argument("--json", default="bench-results/dashboard.json")
    p.add_argument("--from-json", action="store_true", help="redraw --json's series, no run")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.from_json:
        draw(json.loads(Path(args.json).read_text()), Path(args.out))
        return 0
    metrics_port = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="dashboard-"))
    try:
        with serve_session(
            num_cpus=2,
            _metrics_export_port=metrics_port,
            _system_config={"metrics_report_interval_ms": 2000},
        ) as http_port:
            prometheus, prom = start_prometheus(metrics_port, workdir)
            try:
                _render(args, prom, http_port, workdir)
            finally:
                prometheus.terminate()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _render(args: argparse.Namespace, prom: str, http_port: int, workdir: Path) -> None:
    """Deploy the app, drive it for `args.minutes`, then query and draw every panel."""
    config = {
        "model": {"path": str(default_model_dir()), "served_model_name": MODEL},
        "engine": {"kv_cache_bytes": "128MiB"},
        "auth": {"anonymous": {"name": "anonymous", "max_concurrent": 6}},
        "ingress": {"ledger_path": None},
        "audit": {"path": str(workdir / "audit")},
        "tracing": {"path": str(workdir / "traces")},
        "kvstore": {"path": str(workdir / "kv"), "dram_bytes": "32MiB"},
    }
    base = deploy(APP, config, http_port)
    start = time.time()
    asyncio.run(drive(base, args.minutes, args.seed))
    time.sleep(20)  # the last reports reach Prometheus
    panels = query_panels(prom, start, time.time())
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(panels, indent=1))
    draw(panels, Path(args.out))
    empty = [p["title"] for p in panels if not p["series"]]
    logger.info("rendered %d panels to %s; without data: %s", len(panels), args.out, empty)
