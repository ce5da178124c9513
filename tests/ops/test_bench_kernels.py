"""The kernel speed bench's harness runs end to end (on CPU, the torch reference) and writes
its table, JSON and PNG. GPU speed is reported in docs/BENCHMARKS.md, never asserted."""

from __future__ import annotations

import json

from ops.bench.kernels import main


def test_kernels_bench_smoke_on_cpu(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(
        "--device cpu --backend reference --contexts 512,1024 --batch 2 --heads 4 --kv-heads 2 "
        f"--head-dim 64 --iters 2 --copy-bytes {1 << 20} --name t".split()
    )
    assert rc == 0
    report = json.loads((tmp_path / "bench-results" / "t.json").read_text())
    rows = {(r["context"], r["path"]): r for r in report["rows"]}
    assert set(rows) == {(c, p) for c in (512, 1024) for p in ("dense", "sparse-reference")}
    assert rows[(1024, "dense")]["kv_read_frac"] == 1.0
    # 0.17 of the tokens + mean summaries, measured by the engine's own counters
    assert 0.1 < rows[(1024, "sparse-reference")]["kv_read_frac"] < 0.3
    assert all(r["step_ms"] > 0 and r["copy_gbps"] > 0 for r in rows.values())
    assert (tmp_path / "bench-results" / "t.png").stat().st_size > 0
