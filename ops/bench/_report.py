"""Shared benchmark plumbing: machine facts, copy bandwidth, table + JSON + PNG output."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

RESULTS_DIR = Path("bench-results")


def cpu_model_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name: the first "model name" line of `cpuinfo` (Linux), else
    `platform.processor()`, "" where neither knows."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or ""


def machine_info() -> dict[str, Any]:
    """What a benchmark ran on, for its report's meta: the CPU's model name and the SIMD
    level torch's CPU kernels dispatch to (`cpu_capability`, e.g. "AVX2"), thread counts,
    versions, GPU, time and command line."""
    return {
        "cpu": cpu_model_name(),
        "logical_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": " ".join(sys.argv),
    }


def measure_copy_bandwidth_gbps(size_mib: int = 256, repeats: int = 8) -> float:
    """Best-of-N `dst.copy_(src)` rate, counting bytes *read* (the roofline's convention:
    a decode step must read every weight byte once)."""
    src = torch.ones(size_mib << 18, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return src.numel() * src.element_size() / best / 1e9


def write_report(
    name: str,
    rows: list[dict[str, Any]],
    meta: dict[str, Any],
    columns: list[str],
    plot: Callable[[list[dict[str, Any]], Path], None] | None = None,
) -> Path:
    """Print `rows` as a table, write bench-results/<name>.json and, with `plot`, <name>.png."""
    table = Table(title=name)
    for col in columns:
        table.add_column(col, justify="right" if col not in ("workload", "impl") else "left")
    for row in rows:
        table.add_row(*[_fmt(row.get(c)) for c in columns])
    console = Console(width=150)
    console.print(table)
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"{name}.json"
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        plot(rows, RESULTS_DIR / f"{name}.png")
    console.print(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if plot else ""))
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)
