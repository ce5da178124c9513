"""Shared by the benchmarks that run the real app: a free port, and deploy-and-wait."""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
