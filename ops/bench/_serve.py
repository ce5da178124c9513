"""Shared by the benchmarks that run the real app: Ray + Serve up and down (one local Ray, or
a real multi-raylet cluster on this machine), a free port, and deploy-and-wait."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from ops.cluster import LocalCluster, WorkerSpec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_session(num_cpus: int = 2, **ray_init: Any) -> Iterator[int]:
    """Ray and Serve running locally for one benchmark run, and shut down again.

    Args:
        num_cpus: logical CPUs Ray is told it has.
        **ray_init: further `ray.init` keywords (e.g. the dashboard's metrics export port).

    Returns:
        (yields) the local port Serve's HTTP proxy listens on. On exit, also after an error,
        Serve is shut down and then Ray.
    """
    import ray
    from ray import serve

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, **ray_init)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


@contextmanager
def cluster_session(workers: Sequence[WorkerSpec], head_num_cpus: float = 0) -> Iterator[int]:
    """A real Ray cluster on this machine for one benchmark run (`cluster_driver`); yields
    the local port Serve's HTTP proxy listens on."""
    with cluster_driver(workers, head_num_cpus) as (_, port):
        yield port


@contextmanager
def cluster_driver(
    workers: Sequence[WorkerSpec], head_num_cpus: float = 0
) -> Iterator[tuple[LocalCluster, int]]:
    """A head and one raylet per worker (ops.cluster.LocalCluster, each worker offering the
    custom resource {name: 1}), this process its driver, Serve's HTTP proxy on the head
    only; all torn down again.

    Args:
        workers: the worker nodes.
        head_num_cpus: CPUs the head offers (0: only what asks for none, such as the
            Serve controller, the proxy and the app's control plane, runs there).

    Returns:
        (yields) the cluster (to kill and rejoin its nodes) and the local port Serve's HTTP
        proxy listens on. On exit, also after an error, Serve is shut down, then the
        driver's Ray, then every process of the cluster; its state dir (a fresh temp dir,
        never a user's cluster) is removed.
    """
    import ray
    from ray import serve

    from ops.cluster import LocalCluster

    state_dir = Path(tempfile.mkdtemp(prefix="dps-cluster-"))
    auth_mode = os.environ.get("RAY_AUTH_MODE")
    os.environ.setdefault("RAY_AUTH_MODE", "token")  # the cluster's raylets run with token auth
    cluster = LocalCluster(state_dir=state_dir, head_num_cpus=head_num_cpus)
    try:
        cluster.up(workers)
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
            yield cluster, port
        finally:
            serve.shutdown()
            ray.shutdown()
    finally:
        cluster.down()
        shutil.rmtree(state_dir, ignore_errors=True)
        if auth_mode is None:  # a local `ray.init` after this one must not expect a token
            os.environ.pop("RAY_AUTH_MODE", None)


def deploy(
    app: str, args: dict[str, Any], port: int, timeout_s: float = 240, route_prefix: str = "/"
) -> str:
    """(Re)deploy the app under `app` with `args`; returns its base URL once /health is 200."""
    from ray import serve

    from app.builder import build_app

    serve.delete(app)
    serve.run(build_app(args), name=app, route_prefix=route_prefix)
    base = f"http://127.0.0.1:{port}{route_prefix.rstrip('/')}"
    deadline = time.time() + timeout_s
    while httpx.get(f"{base}/health", timeout=5).status_code != 200:
        if time.time() > deadline:
            raise RuntimeError("app never became healthy")
        time.sleep(0.3)
    return base


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`base` with `override`'s keys replacing its own, recursively (sections merge)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
