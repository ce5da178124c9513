"""The engine benchmark runs end to end and writes its table, JSON and PNG (no timing
assertions: speed is reported in docs/BENCHMARKS.md, not asserted in tests)."""

from __future__ import annotations

import json

import pytest

from ops.bench.engine import main


@pytest.mark.slow
@pytest.mark.model
def test_engine_bench_writes_json_and_png(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(
        [
            "--batches",
            "1,2",
            "--decode-tokens",
            "4",
            "--prompt-tokens",
            "16",
            "--prefill-tokens",
            "128",
            "--repeats",
            "1",
            "--name",
            "t",
        ]
    )
    assert rc == 0
    report = json.loads((tmp_path / "bench-results" / "t.json").read_text())
    rows = {(r["workload"], r["impl"]): r for r in report["rows"]}
    assert set(rows) >= {
        ("decode bs1", "dualpath"),
        ("decode bs2", "hf-transformers"),
        ("prefill 128", "dualpath"),
        ("prefill 128", "hf-transformers"),
    }
    ours = rows[("decode bs2", "dualpath")]
    assert ours["tokens_per_s"] > 0 and ours["vs_hf"] > 0 and ours["roofline_frac"] > 0
    assert report["meta"]["copy_bandwidth_gbps"] > 0
    assert (tmp_path / "bench-results" / "t.png").stat().st_size > 10_000
