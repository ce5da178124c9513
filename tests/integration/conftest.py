"""The real application, started once per transport for the whole test session.

Ray (2 logical CPUs: one per engine) and Serve start once; the app is deployed with each
KV transport in turn (pytest groups the tests by this session-scoped parameter). Tests talk
to it over HTTP (openai client, httpx) and through Serve handles.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

APP = "dualpath"
MODEL = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class RunningApp:
    base_url: str
    transport: str
    traces: Path  # the app's tracing.path (file exporter)

    @property
    def openai_url(self) -> str:
        return f"{self.base_url}/v1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


METRICS_PORT = free_port()  # Ray's Prometheus endpoint (ray.init(_metrics_export_port))


@pytest.fixture(scope="session")
def serve_port(model_dir):
    ray = pytest.importorskip("ray")
    from ray import serve

    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _metrics_export_port=METRICS_PORT,
        _system_config={"metrics_report_interval_ms": 1000},  # metrics show within ~2 s
    )
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session", params=["nixl", "object_store"])
def serve_app(request, serve_port, model_dir, tmp_path_factory):
    from ray import serve

    from app.builder import build_app

    traces = tmp_path_factory.mktemp(f"traces-{request.param}")
    args = {
        "model": {"path": str(model_dir), "served_model_name": MODEL},
        # decode engines speculate, as the shipped config does: every test below runs it
        "engine": {
            "kv_cache_bytes": "96MiB",
            "max_num_seqs": 32,
            "speculative": {"method": "ngram"},
        },
        "transfer": {"transport": request.param, "nixl_staging_bytes": "64MiB"},
        "scheduler": {"report_interval_s": 0.2},
        "kvstore": {"path": str(tmp_path_factory.mktemp(f"kv-{request.param}"))},
        "tracing": {"path": str(traces)},
    }
    serve.delete(APP)
    serve.run(build_app(args), name=APP, route_prefix="/")
    base = f"http://127.0.0.1:{serve_port}"
    deadline = time.time() + 120
    while time.time() < deadline:  # engines report to the Scheduler after loading
        if httpx.get(f"{base}/health", timeout=5).status_code == 200:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the app never became healthy")
    return RunningApp(base, request.param, traces)


def engines(role: str | None = None):
    """The Scheduler's view of the engines (LoadReports), through a Serve handle."""
    from ray import serve

    handle = serve.get_deployment_handle("Scheduler", APP)
    reports = handle.engines.remote().result()
    return [r for r in reports if role is None or r.role == role]


def traffic_stats() -> dict:
    from ray import serve

    return serve.get_deployment_handle("TrafficManager-node0", APP).stats.remote().result()


def wait_for_trace(directory, ident, services, timeout_s=20.0):
    """The request's spans (`ops trace`'s lookup) once `services` processes have exported
    theirs and the tree is whole: every parent exported too (each process exports in ~1 s
    batches, so a child can land before its parent)."""
    from ops.traceview import find_trace

    deadline = time.time() + timeout_s
    while True:
        spans = find_trace(directory, ident)
        ids = {s["span_id"] for s in spans}
        whole = all(s["parent_id"] is None or s["parent_id"] in ids for s in spans)
        if (whole and len({s["service"] for s in spans}) >= services) or time.time() > deadline:
            return spans
        time.sleep(0.5)
