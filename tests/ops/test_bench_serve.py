"""`serve_session`, the one Ray + Serve start/stop every app benchmark and the dashboard use,
checked against a recording stand-in for `ray` (starting real Ray belongs to integration)."""

from __future__ import annotations

import sys
import types

import pytest

from ops.bench._serve import serve_session


@pytest.fixture
def calls(monkeypatch) -> list[tuple]:
    """Installs a fake `ray` (with `ray.serve`) whose calls are recorded in order."""
    log: list[tuple] = []
    ray = types.ModuleType("ray")
    serve = types.ModuleType("ray.serve")
    ray.init = lambda **kw: log.append(("ray.init", kw))
    ray.shutdown = lambda: log.append(("ray.shutdown",))
    serve.start = lambda **kw: log.append(("serve.start", kw))
    serve.shutdown = lambda: log.append(("serve.shutdown",))
    ray.serve = serve
    monkeypatch.setitem(sys.modules, "ray", ray)
    monkeypatch.setitem(sys.modules, "ray.serve", serve)
    return log


def test_starts_ray_then_serve_on_the_yielded_port_and_stops_serve_first(calls):
    """Serve listens on the port the benchmark is handed, Ray gets the CPU count and extra
    `ray.init` keywords, and Serve stops before Ray (Serve's controller is a Ray actor)."""
    with serve_session(num_cpus=4, _metrics_export_port=1234) as port:
        assert [c[0] for c in calls] == ["ray.init", "serve.start"]
    assert calls == [
        (
            "ray.init",
            {
                "num_cpus": 4,
                "include_dashboard": False,
                "log_to_driver": False,
                "_metrics_export_port": 1234,
            },
        ),
        ("serve.start", {"http_options": {"host": "127.0.0.1", "port": port}}),
        ("serve.shutdown",),
        ("ray.shutdown",),
    ]


def test_shuts_both_down_when_the_benchmark_raises(calls):
    """A failed run must not leave Ray and Serve running for the next benchmark."""
    with pytest.raises(RuntimeError, match="boom"), serve_session():
        raise RuntimeError("boom")
    assert [c[0] for c in calls] == ["ray.init", "serve.start", "serve.shutdown", "ray.shutdown"]
    assert calls[0][1]["num_cpus"] == 2
