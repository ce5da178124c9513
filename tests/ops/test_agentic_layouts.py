"""The agentic bench's pure parts without Ray: its layouts (one local Ray vs a real cluster),
the app args per mode and layout, the rows it summarises and the report it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.config import AppConfig
from ops.bench._agentic_report import (
    COLUMNS,
    KV_COUNTERS,
    LAYOUTS,
    NODES,
    TurnRecord,
    add_vs_single,
    layouts_of,
    report_meta,
    summarize,
)
from ops.bench._agentic_report import plot as _plot
from ops.bench._report import write_report
from ops.bench.agentic import app_args, parse_args

EMULATED, CLUSTER = LAYOUTS["emulated"], LAYOUTS["cluster"]


def _args(*argv: str):
    return parse_args(["--model", "/nonexistent", *argv])


@pytest.mark.parametrize(
    ("argv", "layout", "name"),
    [
        ([], "emulated", "agentic"),
        (["--layout", "cluster"], "cluster", "agentic-cluster"),
        (["--layout", "both"], "both", "agentic-cluster"),
        (["--layout", "both", "--name", "mine"], "both", "mine"),
        (["--sweep"], "emulated", "agentic-sweep"),
    ],
)
def test_layout_defaults_to_emulated_and_picks_the_report_name(argv, layout, name):
    args = _args(*argv)
    assert (args.layout, args.name) == (layout, name)


def test_both_runs_emulated_then_cluster():
    assert layouts_of("both") == ["emulated", "cluster"]
    assert layouts_of("cluster") == ["cluster"]
    assert LAYOUTS == {
        "emulated": "emulated: 1 Ray node",
        "cluster": "cluster: 4 Ray nodes (head + 3)",
    }


@pytest.mark.parametrize("argv", [["--layout", "nope"], ["--sweep", "--layout", "both"]])
def test_unknown_layouts_and_a_cluster_sweep_are_refused(argv):
    with pytest.raises(SystemExit):
        _args(*argv)


def test_emulated_app_args_pin_nothing(tmp_path):
    out = app_args(_args(), "dualpath", tmp_path)
    assert "control_ray_resources" not in out
    assert [n["name"] for n in out["nodes"]] == list(NODES)
    assert all("ray_resources" not in n for n in out["nodes"])
    assert out["scheduler"] == {"policy": "dualpath", "report_interval_s": 0.1}
    AppConfig.model_validate(out)


def test_cluster_app_args_pin_each_node_to_its_raylet_and_the_control_plane_to_the_head(
    tmp_path,
):
    """The node names are the raylets' custom resources, and the same names as emulated,
    so the per-node stats (TrafficManager-<node>) are found on either layout."""
    out = app_args(_args(), "single_path", tmp_path, "cluster")
    assert out["control_ray_resources"] == {"head": 0.01}
    assert {n["name"]: n["ray_resources"] for n in out["nodes"]} == {n: {n: 0.01} for n in NODES}
    config = AppConfig.model_validate(out)
    assert config.scheduler.policy == "single_path"
    assert [n.ray_resources for n in config.nodes] == [{n: 0.01} for n in NODES]


def test_nopull_mode_is_dualpath_without_dram_pulls(tmp_path):
    args = _args("--snic-mbps", "10")
    out = app_args(args, "dualpath_nopull", tmp_path, "cluster")
    assert out["scheduler"] == {"policy": "dualpath", "dram_pulls": False, "report_interval_s": 0.1}
    assert all(n["snic_bandwidth"] == 10_000_000 for n in out["nodes"])  # capped, unlike oracle
    config = AppConfig.model_validate(out)
    assert config.scheduler.policy_config().dram_pulls is False
    assert AppConfig.model_validate(app_args(args, "dualpath", tmp_path)).scheduler.dram_pulls
    oracle = app_args(args, "oracle", tmp_path)
    assert oracle["scheduler"]["policy"] == "dualpath"
    assert all(n["snic_bandwidth"] is None for n in oracle["nodes"])


def test_app_args_flag_still_overrides_the_mode(tmp_path):
    args = _args("--app-args", '{"scheduler": {"dram_pulls": true}, "kvstore": {"dram_bytes": 5}}')
    out = app_args(args, "dualpath_nopull", tmp_path)
    assert out["scheduler"]["dram_pulls"] is True and out["kvstore"]["dram_bytes"] == 5


def _stats(pulled: dict[str, int]):
    nodes = {
        n: {
            "snic": {"bytes_read_total": 100 * (i + 1), "bytes_written_total": 10},
            "kvstore": {"blocks_pulled": i, "read_timeouts": 0, "other": 9},
        }
        for i, n in enumerate(NODES)
    }
    sched = {
        "read_paths": {"pe": 3, "de": 2},
        "read_blocks": {"pnode": 6, "dnode0": 4},
        "snic_blocks": {"pnode": 5, "dnode0": 1},
        "pulled_blocks": pulled,
    }
    return nodes, sched


def _records():
    return [
        TurnRecord(0, t, 1000, 900 if t else 0, 0.5 + t / 10, 0.05, {"kv_read_ms": 20.0})
        for t in range(3)
    ]


def test_a_row_carries_its_layout_and_the_pulls(tmp_path):
    nodes, sched = _stats({"pnode": 2, "dnode1": 3})
    row = summarize("dualpath", "offline", 12.345, _records(), nodes, sched, "cluster")
    assert row["layout"] == CLUSTER and row["jct_s"] == 12.35
    assert row["pulled_blocks"] == 5
    assert row["snic_blocks"] == {"pnode": 5, "dnode0": 1}
    assert row["kv"]["dnode1"]["blocks_pulled"] == 2 and "other" not in row["kv"]["dnode1"]
    assert "blocks_pulled" in KV_COUNTERS
    assert row["read_paths"] == "de:2,pe:3" and row["hit_rate"] == 0.9
    # a Scheduler that predates the pull counters still summarises (0 pulls, no SNIC plan)
    old = {"read_paths": {"pe": 1}}
    row = summarize("single_path", "offline", 1.0, _records(), nodes, old)
    assert row["layout"] == EMULATED and row["pulled_blocks"] == 0 and row["snic_blocks"] == {}


def _row(mode, layout, load, jct):
    return {"mode": mode, "layout": layout, "load": load, "jct_s": jct}


def test_vs_single_compares_within_one_layout_and_load():
    rows = add_vs_single(
        [
            _row("single_path", EMULATED, "offline", 100.0),
            _row("dualpath", EMULATED, "offline", 80.0),
            _row("dualpath", EMULATED, "online 0.2/s", 50.0),  # no single_path at this load
            _row("single_path", CLUSTER, "offline", 60.0),
            _row("dualpath", CLUSTER, "offline", 40.0),
            _row("dualpath_nopull", CLUSTER, "offline", 48.0),
        ]
    )
    assert [r["vs_single"] for r in rows] == [1.0, 1.25, None, 1.0, 1.5, 1.25]


def test_report_meta_names_the_layouts_that_ran():
    args = _args("--layout", "both", "--modes", "single_path,dualpath")
    rows = [
        {**_row("single_path", EMULATED, "online 0.2/s", 9.0), "slo_ok": True},
        {**_row("dualpath", EMULATED, "online 0.4/s", 9.0), "slo_ok": True},
        {**_row("dualpath", CLUSTER, "online 0.4/s", 9.0), "slo_ok": False},
    ]
    failures = [{"layout": "x", "error": "e"}]
    meta = report_meta(args, rows, failures, None)
    assert list(meta["layouts"]) == [EMULATED, CLUSTER]
    assert "real Ray cluster" in meta["layouts"][CLUSTER] and "12.0 MB/s" in meta["layout"]
    assert meta["layout_failures"] == failures
    assert meta["max_online_rate_within_slo"] == {"single_path": 0.2, "dualpath": 0.4}
    assert meta["max_online_rate_within_slo_by_layout"][CLUSTER] == {
        "single_path": None,
        "dualpath": None,
    }
    # only the emulated half ran: the meta says so, the description as before --layout
    meta = report_meta(args, rows[:2], [], None)
    assert list(meta["layouts"]) == [EMULATED] and meta["layout"] == meta["layouts"][EMULATED]


def _full_row(mode, layout, jct, pulled):
    nodes, sched = _stats({"dnode0": pulled} if pulled else {})
    row = summarize(mode, "offline", jct, _records(), nodes, sched, layout)
    return {**row, "slo_ok": True}


@pytest.mark.parametrize("layouts", [["emulated"], ["emulated", "cluster"]])
def test_report_has_the_new_columns_and_a_plot(tmp_path, monkeypatch, layouts):
    monkeypatch.chdir(tmp_path)
    rows = [
        _full_row(mode, layout, jct * (1 + i), pulled)
        for i, layout in enumerate(layouts)
        for mode, jct, pulled in (("single_path", 10.0, 0), ("dualpath", 8.0, 4))
    ]
    add_vs_single(rows)
    assert {"layout", "pulled_blocks", "vs_single"} <= set(COLUMNS)
    path: Path = write_report("t", rows, {"layouts": layouts}, COLUMNS, _plot)
    report = json.loads(path.read_text())
    assert [r["layout"] for r in report["rows"]] == [LAYOUTS[k] for k in layouts for _ in "ab"]
    assert [r["vs_single"] for r in report["rows"]] == [1.0, 1.25] * len(layouts)
    assert path.with_suffix(".png").stat().st_size > 0
