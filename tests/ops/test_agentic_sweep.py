"""The agentic shape sweep without Ray: its shapes, and the ratios and verdicts it reports."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest

from ops.bench.agentic import DEFAULT_KV_CACHE_MIB, DEFAULT_SHAPE, main
from ops.bench.agentic_sweep import (
    MODEL_CONTEXT,
    SHAPES,
    add_ratios,
    evaluate,
    oracle_gain_share,
    select_shapes,
    summary_line,
    write_sweep,
)
from ops.sim.traces import make_trace


def _row(mode, jct, snic=1.1, hit=0.9):
    return {"mode": mode, "jct_s": jct, "snic_max_avg": snic, "hit_rate": hit}


def _rows(single=100.0, dualpath=70.0, split=80.0, oracle=60.0, **dp):
    return add_ratios(
        [
            _row("single_path", single, snic=2.4, hit=0.9),
            _row("dualpath", dualpath, **dp),
            _row("dualpath_split", split),
            _row("oracle", oracle, snic=2.2),
        ]
    )


def test_default_shape_is_the_documented_benchmark():
    """The sweep's `default` is exactly agentic.py's default trace and KV pool, so its
    numbers compare with docs/BENCHMARKS.md."""
    d = SHAPES["default"]
    assert {k: getattr(d, k) for k in DEFAULT_SHAPE} == DEFAULT_SHAPE
    assert d.kv_cache_mib == DEFAULT_KV_CACHE_MIB == 160


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_shape_fits_the_model_context_and_one_engines_kv_pool(name):
    """An engine refuses a prompt + max_tokens beyond its pool or the model's context: the
    longest sequence make_trace can draw must fit both, with room in the context."""
    s = SHAPES[name]
    args = SimpleNamespace(seed=0, **{k: getattr(s, k) for k in DEFAULT_SHAPE})
    drawn = max(
        len(a.context) + sum(map(len, a.appends)) + sum(a.gens) for a in make_trace(args, 49152)
    )
    assert drawn <= s.max_tokens
    assert s.max_tokens <= 0.6 * MODEL_CONTEXT
    assert s.max_tokens < s.kv_pool_tokens


def test_shapes_cover_the_ranges_of_the_sweep():
    """Together the shapes span ~32 to ~1,000 appended tokens, ~512 to ~4,000 context
    tokens, ~8 to ~128 generated tokens and 2 to 8 agents."""
    shapes = SHAPES.values()
    span = {
        k: (min(getattr(s, k) for s in shapes), max(getattr(s, k) for s in shapes))
        for k in DEFAULT_SHAPE
    }
    assert span["append"][0] <= 32 and span["append"][1] >= 1000
    assert span["context"][0] <= 512 and span["context"][1] >= 3500
    assert span["gen"][0] <= 8 and span["gen"][1] >= 128
    assert span["agents"] == (2, 8)
    assert len(SHAPES) >= 5


def test_select_shapes_applies_overrides_and_rejects_unknown_names():
    picked = select_shapes("long-gen,default", {"turns": 2})
    assert [(s.name, s.turns, s.gen) for s in picked] == [("long-gen", 2, 128), ("default", 2, 8)]
    assert [s.name for s in select_shapes("", {})] == list(SHAPES)
    with pytest.raises(ValueError, match="nope"):
        select_shapes("default,nope", {})


def test_ratios_and_oracle_gain_share():
    """vs_single = single JCT / mode JCT; oracle gain = (single - mode) / (single - oracle),
    on DualPath modes only."""
    rows = {r["mode"]: r for r in _rows()}
    assert [rows[m]["vs_single"] for m in rows] == [1.0, 1.43, 1.25, 1.67]
    assert rows["dualpath"]["oracle_gain"] == 0.75
    assert rows["dualpath_split"]["oracle_gain"] == 0.5
    assert rows["single_path"]["oracle_gain"] is None and rows["oracle"]["oracle_gain"] is None


def test_oracle_gain_is_undefined_when_the_oracle_gains_nothing():
    assert oracle_gain_share(50.0, 45.0, 50.0) is None
    assert oracle_gain_share(50.0, 45.0, 55.0) is None
    assert oracle_gain_share(100.0, 105.0, 60.0) == -0.12


def test_a_storage_bound_shape_is_judged_on_every_target():
    verdict = evaluate(_rows(dualpath=70.0, snic=1.35, hit=0.85))
    assert verdict["oracle_x"] == 1.67 and verdict["storage_bound"] is True
    dp = {k: v["pass"] for k, v in verdict["targets"]["dualpath"].items()}
    assert dp == {
        "speedup_x": True,  # 1.43 >= 1.3
        "oracle_share": False,  # 0.75 < 0.8
        "snic_max_avg": False,  # 1.35 > 1.3
        "hit_rate": False,  # 0.85 < single's 0.9
        "floor_x": True,
    }
    split = {k: v["pass"] for k, v in verdict["targets"]["dualpath_split"].items()}
    assert split == {
        "speedup_x": False,  # 1.25
        "oracle_share": False,  # 0.5
        "snic_max_avg": True,
        "hit_rate": True,  # equal to single's
        "floor_x": True,
    }


def test_the_oracle_bound_targets_read_na_where_even_the_oracle_gains_little():
    """Under 1.3x for the oracle the shape is not storage-bound: the 1.3x and 80% targets
    cannot be met and are not judged; the 0.97x floor still is."""
    verdict = evaluate(_rows(single=100.0, dualpath=104.0, split=99.0, oracle=95.0))
    assert verdict["storage_bound"] is False
    dp = verdict["targets"]["dualpath"]
    assert dp["speedup_x"] == {"value": 0.96, "pass": None}
    assert dp["oracle_share"]["pass"] is None
    assert dp["floor_x"] == {"value": 0.96, "pass": False}
    assert verdict["targets"]["dualpath_split"]["floor_x"]["pass"] is True
    line = summary_line("long-gen", verdict)
    assert line.startswith("long-gen: oracle 1.05x (not storage-bound)")
    assert ">=1.3x n/a (0.96)" in line and ">=0.97x FAIL" in line


def test_missing_modes_leave_targets_unjudged():
    rows = add_ratios([_row("single_path", 100.0), _row("dualpath", 70.0)])
    verdict = evaluate(rows)
    assert verdict["oracle_x"] is None and verdict["storage_bound"] is None
    dp = verdict["targets"]["dualpath"]
    assert dp["speedup_x"]["pass"] is True and dp["oracle_share"]["pass"] is None
    assert set(verdict["targets"]) == {"dualpath"}


def test_report_holds_every_shapes_verdict_and_a_plot(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shapes = select_shapes("default,long-gen", {})
    rows = [{"shape": "default", **r, "read_paths": "pe:20", "snic_bytes": {}} for r in _rows()]
    args = argparse.Namespace(name="t", snic_mbps=12.0, warmup_turns=1)
    path = write_sweep(args, shapes, rows, [{"shape": "long-gen", "mode": "x", "error": "e"}], {})
    report = json.loads(path.read_text())
    assert list(report["shapes"]) == ["default"]  # long-gen measured nothing
    assert report["shapes"]["default"]["targets"]["dualpath"]["speedup_x"]["pass"] is True
    assert report["meta"]["failures"][0]["shape"] == "long-gen"
    assert path.with_suffix(".png").stat().st_size > 0


def test_sweep_refuses_online_rates():
    with pytest.raises(SystemExit):
        main(["--sweep", "--online-rates", "0.1"])
