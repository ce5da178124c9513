"""The quality benchmark scores every precision against fp32 on real text, and int4 stays
close to fp32: a broken quantised decode path (wrong codes, scales or packing) gives a
perplexity in the thousands, and a wrong greedy answer, which this test catches."""

from __future__ import annotations

import json
import math

import pytest

from ops.bench.quality import main


@pytest.mark.slow
@pytest.mark.model
def test_quality_bench_int4_close_to_fp32(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--windows", "2", "--context", "64", "--steps", "8", "--name", "t"]
    assert main([*argv, "--model", str(model_dir)]) == 0
    report = json.loads((tmp_path / "bench-results" / "t.json").read_text())
    rows = {r["impl"]: r for r in report["rows"]}
    assert set(rows) == {"fp32", "bf16", "int8", "int4"}
    fp32, int4 = rows["fp32"], rows["int4"]
    assert fp32["top1_agreement_pct"] == 100 and fp32["ppl_delta_pct"] == 0
    assert fp32["prefill_agreement_pct"] == 100  # one float32 engine, two paths: same argmax
    assert math.isfinite(int4["ppl"]) and abs(int4["ppl"] / fp32["ppl"] - 1) < 0.25
    assert int4["quant_sources"] == {"gguf": 120, "quantised": 0}  # the GGUF's own codes
    for impl, row in rows.items():
        assert "Paris" in row["answer"] and row["paris"], (impl, row["answer"])
    assert report["meta"]["cpu_capability"]
    assert (tmp_path / "bench-results" / "t.png").stat().st_size > 10_000
