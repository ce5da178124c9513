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
    for workload in ("decode bs1", "decode bs2", "prefill 128"):
        assert {(workload, impl) for impl in ("fp32", "int8", "int4", "hf fp32")} <= set(rows)
    ours = rows[("decode bs2", "int4")]
    assert ours["tokens_per_s"] > 0 and ours["vs_hf"] > 0 and ours["vs_fp32"] > 0
    assert ours["roofline_frac"] > 0
    # the targets are checked on int4 where it names them (batch 1 / 8 / 32, prefill)
    assert rows[("decode bs1", "int4")]["status"] in ("PASS", "MISS")
    assert rows[("prefill 128", "int4")]["status"] in ("PASS", "MISS")
    meta = report["meta"]
    assert meta["copy_bandwidth_gbps"] > 0
    # int4 reads the GGUF's codes and fewer bytes per step than int8, which reads fewer than fp32
    assert meta["quant_sources"]["int4"]["gguf"] == 120
    assert (
        meta["weight_bytes"]["int4"] < meta["weight_bytes"]["int8"] < meta["weight_bytes"]["fp32"]
    )
    assert (tmp_path / "bench-results" / "t.png").stat().st_size > 10_000
