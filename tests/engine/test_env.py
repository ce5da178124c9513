"""engine/env.py: the one place environment variables are read."""

from __future__ import annotations

from pathlib import Path

from deployments.options import KVStoreSection, TracingSection
from engine import env
from engine.config import model_cache_dir


def test_variables_are_read_when_asked_and_empty_means_unset(monkeypatch, tmp_path):
    """Nothing is cached at import, so a variable set later (a test, a launcher) counts;
    an empty value falls back to the default like an unset one."""
    monkeypatch.setenv(env.KV_DIR, str(tmp_path))
    assert KVStoreSection().path == tmp_path
    monkeypatch.setenv(env.KV_DIR, "")
    assert KVStoreSection().path == Path.home() / ".cache" / "dualpath-serve" / "kvstore"
    monkeypatch.setenv(env.MODEL_CACHE, str(tmp_path / "models"))
    assert model_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert env.omp_num_threads() is None
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert env.omp_num_threads() == 3


def test_the_traces_endpoint_prefers_config_then_the_traces_variable(monkeypatch):
    """The config's URL wins; of the OpenTelemetry variables the traces-only one wins."""
    monkeypatch.setenv(env.OTLP_ENDPOINT, "http://any:4318")
    monkeypatch.delenv(env.OTLP_TRACES_ENDPOINT, raising=False)
    assert TracingSection().endpoint() == "http://any:4318"
    monkeypatch.setenv(env.OTLP_TRACES_ENDPOINT, "http://traces:4318/v1/traces")
    assert TracingSection().endpoint() == "http://traces:4318/v1/traces"
    assert TracingSection(otlp_endpoint="http://cfg").endpoint() == "http://cfg"
