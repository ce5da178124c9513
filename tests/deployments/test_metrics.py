"""The metrics registry: names, kinds and labels are checked on every call."""

from __future__ import annotations

import pytest

from deployments.metrics import SPECS, Metrics


def test_memory_backend_counts_sets_and_observes():
    m = Metrics("memory")
    m.inc("dualpath_read_path_total", path="de")
    m.inc("dualpath_read_path_total", 2, path="de")
    m.set("dualpath_queue_depth", 3, service_tier="flex")
    m.set("dualpath_queue_depth", 1, service_tier="flex")
    m.observe("dualpath_ttft_seconds", 0.5, service_tier="default")
    assert m.value("dualpath_read_path_total", path="de") == 3
    assert m.value("dualpath_queue_depth", service_tier="flex") == 1
    assert m.samples[("dualpath_ttft_seconds", (("service_tier", "default"),))] == [0.5]


def test_wrong_kind_or_labels_fail_loudly():
    m = Metrics("memory")
    with pytest.raises(ValueError):
        m.set("dualpath_read_path_total", 1, path="de")  # a counter
    with pytest.raises(ValueError):
        m.inc("dualpath_read_path_total", node="x")  # wrong label
    with pytest.raises(KeyError):
        m.inc("dualpath_unknown_total")


def test_the_dashboard_covers_every_metric():
    import json
    from pathlib import Path

    board = (Path(__file__).parents[2] / "ops" / "dashboards" / "dualpath.json").read_text()
    assert all(f"ray_{name}" in board for name in SPECS), [
        n for n in SPECS if f"ray_{n}" not in board
    ]
    json.loads(board)
