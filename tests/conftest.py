"""Shared fixtures: the converted default model (fetched once per session) and engines."""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from deployments import tracing
from engine import EngineConfig, EngineCore
from ops.model_fetch import ensure_default_model

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


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The default model, converted from the PyPI GGUF on first use (the user's path)."""
    return ensure_default_model()


@pytest.fixture(scope="session")
def engine(model_dir: Path) -> EngineCore:
    """A float32 engine with 64-token blocks, shared by tests that leave it idle."""
    eng = EngineCore(EngineConfig(model=model_dir, num_threads=2, kv_cache_bytes=256 << 20))
    yield eng
    assert not eng.has_unfinished(), "a test left requests running"


@pytest.fixture(scope="session")
def small_engine(model_dir: Path) -> EngineCore:
    """Tiny pool (24 blocks x 16 tokens) and a 32-token step budget: forces chunked prefill
    and preemption with short prompts."""
    return EngineCore(
        EngineConfig(
            model=model_dir,
            num_threads=2,
            block_size=16,
            num_kv_blocks=24,
            max_num_batched_tokens=32,
            max_num_seqs=8,
        )
    )
