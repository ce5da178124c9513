"""A real Ray cluster on this machine for the tests in this directory: a head and named
worker raylets started with `ray start` (ops.cluster.LocalCluster), this test process its
driver, Serve's proxy on the head. Each module starts its own cluster and tears it down.

These run in their own pytest process (`make test-cluster`): a driver connects to one Ray
cluster per process, and the integration suite starts a local one of its own.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from ops.cluster import LocalCluster, WorkerSpec

# NOTE: Ray reads its auth mode once, when it is first imported: before any test imports it
os.environ.setdefault("RAY_AUTH_MODE", "token")
MODEL = "smol"


@contextmanager
def ray_cluster(tmp: Path, workers: list[WorkerSpec], head_num_cpus: float = 0) -> Iterator[Any]:
    """The cluster up, this process its driver and Serve started (HTTP on the head only);
    yields (cluster, Serve's port). Everything is torn down on exit, also after a failure."""
    import ray
    from ray import serve

    from ops.bench._serve import free_port

    cluster = LocalCluster(state_dir=tmp / "cluster", head_num_cpus=head_num_cpus)
    try:
        cluster.up(workers)
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        yield cluster, port
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
                ray.shutdown()
        finally:
            cluster.down()


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


def deploy(name: str, args: dict[str, Any], port: int, timeout_s: float = 300) -> str:
    """Deploy under `/name`; the base URL once /health is 200 (every engine reported)."""
    from ray import serve

    from app.builder import build_app

    serve.run(build_app({**args, "name": name}), name=name, route_prefix=f"/{name}")
    base = f"http://127.0.0.1:{port}/{name}"
    wait_for(lambda: httpx.get(f"{base}/health", timeout=5).status_code == 200, timeout_s, "health")
    return base


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.25)


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
