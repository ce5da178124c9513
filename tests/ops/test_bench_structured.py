"""The structured-output benchmark runs end to end on the tiny model and writes its table,
JSON and PNG (no timing assertions: the overhead is reported in docs/BENCHMARKS.md, not
asserted in tests)."""

from __future__ import annotations

import json

from ops.bench.structured import main


def test_structured_bench_writes_json_and_png(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(
        f"--model {tiny_model_dir} --threads 1 --decode-tokens 4 --repeats 1 "
        "--compile-grammars 3 --mask-replays 1 --name t".split()
    )
    assert rc == 0
    report = json.loads((tmp_path / "bench-results" / "t.json").read_text())
    rows = {r["workload"]: r for r in report["rows"]}
    decode = [rows[f"decode bs8, {p} structured"] for p in ("0%", "50%", "100%")]
    decode += [rows[f"decode bs8, {p} structured +ff"] for p in ("50%", "100%")]
    kinds = [(r["json_rows"], r["tool_rows"]) for r in decode]
    assert kinds == [(0, 0), (2, 2), (4, 4), (2, 2), (4, 4)]
    assert all(r["tpot_ms"] > 0 and r["tokens_per_s"] > 0 and r["steps"] >= 1 for r in decode)
    assert decode[2]["status"] in ("PASS", "MISS") and decode[1]["vs_0pct"] > 0
    for name in (
        "compile 10 tools, miss",
        "compile 10 tools, hit",
        "fill 1 row, json_schema",
        "fill 1 row, 10 tools",
    ):
        assert rows[name]["p50_ms"] > 0 and rows[name]["p99_ms"] >= rows[name]["p50_ms"]
    assert rows["compile 10 tools, miss"]["n"] == 3
    assert report["meta"]["cpu_capability"]
    assert (tmp_path / "bench-results" / "t.png").stat().st_size > 0
