"""Helpers for the tests in this directory. Each module starts its own real Ray cluster on
this machine with `ops.bench._serve.cluster_driver` (a head and named worker raylets, each
a `ray start`; this test process its driver; Serve's proxy on the head) and tears it down.

These run in their own pytest process (`make test-cluster`): a driver connects to one Ray
cluster per process, and the integration suite starts a local one of its own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ops.bench._serve import deploy as serve_deploy

# NOTE: Ray reads its auth mode once, when it is first imported: before any test imports it
os.environ.setdefault("RAY_AUTH_MODE", "token")
MODEL = "smol"


def app_args(model_dir: Path, root: Path, nodes: list[dict[str, Any]], **extra: Any) -> dict:
    """The app on the cluster: float32 engines (greedy output is exact across batch shapes),
    a shared NVMe directory, tracing to files, an audit log; nodes pinned as given."""
    args: dict[str, Any] = {
        "model": {"path": str(model_dir), "served_model_name": MODEL},
        "engine": {"kv_cache_bytes": "48MiB", "num_threads": 1, "max_num_seqs": 16},
        "transfer": {"transport": "auto", "nixl_staging_bytes": "48MiB"},
        "scheduler": {"report_interval_s": 0.2},
        "kvstore": {"path": str(root / "kv"), "dram_bytes": "64MiB", "fsync": False},
        "ingress": {"ledger_path": None, "max_replica_retries": 8},
        "tracing": {"path": str(root / "traces")},
        "audit": {"path": str(root / "audit")},
        "control_ray_resources": {"head": 0.01},
        "nodes": nodes,
    }
    for key, value in extra.items():
        args[key] = {**args.get(key, {}), **value} if isinstance(value, dict) else value
    return args


def deploy(name: str, args: dict[str, Any], port: int) -> str:
    """Deploy under `/name`; the base URL once /health is 200 (every engine reported)."""
    return serve_deploy(name, {**args, "name": name}, port, 300, route_prefix=f"/{name}")


def audit_lines(root: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for f in sorted((root / "audit").glob("audit-*.jsonl"))
        for line in f.read_text().splitlines()
    ]


def spans(root: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for f in sorted((root / "traces").glob("spans-*.jsonl"))
        for line in f.read_text().splitlines()
        if line.strip()
    ]
