"""Shared fixtures: a tiny random-weight Llama written here (fresh engine per test), the
converted default model (fetched once per session, for tests marked `model`), and guards
that keep Ray to tests marked `integration` and the real model to tests marked `model`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from deployments import tracing
from engine import EngineConfig, EngineCore
from ops.model_fetch import ensure_default_model
from tests.helpers import write_tiny_llama

_SPANS = InMemorySpanExporter()


@pytest.fixture(scope="session", autouse=True)
def _in_memory_traces() -> None:
    """Spans made in the test process go to memory (deployments' setup_tracing no-ops)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_SPANS))
    tracing.install_provider(provider)


@pytest.fixture
def spans() -> InMemorySpanExporter:
    """The in-memory exporter, emptied for this test."""
    _SPANS.clear()
    return _SPANS


@pytest.fixture(autouse=True)
def _ray_only_in_integration_tests(request, monkeypatch) -> None:
    """A test not marked `integration` that starts Ray fails, so the fast suite stays
    Ray-free (Serve starts Ray through the same function)."""
    if request.node.get_closest_marker("integration") is not None:
        return
    import ray
    import ray._private.worker

    def refuse(*args, **kwargs):
        pytest.fail("ray.init in a test not marked integration", pytrace=False)

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray._private.worker, "init", refuse)


@pytest.fixture(autouse=True)
def _real_model_only_in_model_tests(request) -> None:
    """A unit test that loads the real converted model must be marked `model` (the fast
    suite deselects those)."""
    if "model_dir" in request.fixturenames and not any(
        request.node.get_closest_marker(m) for m in ("model", "integration")
    ):
        pytest.fail("uses the real model (model_dir) but is not marked `model`", pytrace=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-weight toy Llama and tokenizer, written once per session (read-only after)."""
    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture
def tiny_engine(tiny_model_dir: Path) -> EngineCore:
    """A fresh engine on the toy model for this test alone (no prefix cache carried over):
    16-token blocks, 256 of them, float32."""
    eng = EngineCore(
        EngineConfig(model=tiny_model_dir, num_threads=1, block_size=16, num_kv_blocks=256)
    )
    yield eng
    assert not eng.has_unfinished(), "the test left requests running"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The default model, converted from the PyPI GGUF on first use (the user's path)."""
    return ensure_default_model()


@pytest.fixture(scope="session")
def engine(model_dir: Path) -> EngineCore:
    """The real model in a float32 engine with 64-token blocks, shared by the `model` tests
    that leave it idle (unit tests use `tiny_engine`, fresh per test)."""
    eng = EngineCore(EngineConfig(model=model_dir, num_threads=2, kv_cache_bytes=256 << 20))
    yield eng
    assert not eng.has_unfinished(), "a test left requests running"


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/cluster start multi-node Ray clusters and connect this process to them as a
    driver: they run in a pytest process of their own (`make test-cluster` sets
    DUALPATH_CLUSTER_TESTS=1), never beside the integration suite's local Ray."""
    here = Path(__file__).parent
    if collection_path == here / "cluster" and not os.environ.get("DUALPATH_CLUSTER_TESTS"):
        return True
    return None
