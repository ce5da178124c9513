"""ops/dashboards/dualpath.json: Grafana-shaped (rows, panels with targets, unique ids, a
non-overlapping grid, the datasource variable) and every app metric queried with Ray's
`ray_` prefix."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

DASHBOARD = Path(__file__).resolve().parents[2] / "ops" / "dashboards" / "dualpath.json"
ROWS = [
    "Requests & latency",
    "Admission",
    "KV cache & storage NIC",
    "Engines",
    "Billing",
    "Speculative decoding",
]
HISTOGRAMS = ["dualpath_ttft_seconds", "dualpath_tpot_seconds"]
METRICS = [
    *(f"{h}_bucket" for h in HISTOGRAMS),
    "dualpath_requests_total",
    "dualpath_admission_rejections_total",
    "dualpath_queue_depth",
    "dualpath_kv_hit_tokens_total",
    "dualpath_prompt_tokens_total",
    "dualpath_snic_queue_bytes",
    "dualpath_snic_bytes_total",
    "dualpath_read_path_total",
    "dualpath_engine_running",
    "dualpath_engine_waiting",
    "dualpath_engine_free_blocks",
    "dualpath_cost_total",
]
DS = {"type": "prometheus", "uid": "${datasource}"}


@pytest.fixture(scope="module")
def dash() -> dict:
    return json.loads(DASHBOARD.read_text())


def graphs(dash: dict) -> list[dict]:
    return [p for p in dash["panels"] if p["type"] != "row"]


def exprs(dash: dict) -> list[str]:
    return [t["expr"] for p in graphs(dash) for t in p["targets"]]


def test_dashboard_shape(dash):
    """Grafana imports it: the five rows, unique ids, every panel on ${datasource}."""
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    assert 36 <= dash["schemaVersion"] <= 41
    ds = next(v for v in dash["templating"]["list"] if v["name"] == "datasource")
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    assert [p["title"] for p in dash["panels"] if p["type"] == "row"] == ROWS
    for p in graphs(dash):
        assert p["type"] in ("timeseries", "stat", "gauge", "bargauge", "table"), p["title"]
        assert p["title"] and p["datasource"] == DS and p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        assert all(t["expr"] and t.get("datasource", DS) == DS for t in p["targets"])


def test_grid_positions_fit_and_do_not_overlap(dash):
    """Panels fit the 24-column grid without overlapping (Grafana would reflow them)."""
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in "hwxy") and g["h"] > 0 and g["w"] > 0
        x, y, w, h = g["x"], g["y"], g["w"], g["h"]
        assert x >= 0 and x + w <= 24, p["title"]
        mine = {(i, j) for i in range(x, x + w) for j in range(y, y + h)}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine
    rows = [p for p in dash["panels"] if p["type"] == "row"]
    assert [r["gridPos"]["y"] for r in rows] == sorted(r["gridPos"]["y"] for r in rows)


@pytest.mark.parametrize("metric", METRICS)
def test_every_metric_is_queried_with_the_ray_prefix(dash, metric):
    """Each exported metric has a panel, under the name Ray's Prometheus endpoint gives it."""
    pattern = re.compile(rf"(?<![\w:])ray_{metric}(?![\w:])")
    assert any(pattern.search(e) for e in exprs(dash)), metric


def test_expressions_are_well_formed(dash):
    """No unprefixed name, balanced brackets, p50 and p99 of each histogram over rate(_bucket)."""
    for e in exprs(dash):
        assert not re.search(r"(?<![\w:])dualpath_", e), f"missing ray_ prefix: {e}"
        stack = []
        for ch in e:
            if ch in "([{":
                stack.append(ch)
            elif ch in ")]}":
                assert stack and "([{"[")]}".index(ch)] == stack.pop(), e
        assert not stack, e
    quantiles = [e for e in exprs(dash) if "histogram_quantile" in e]
    assert all("_bucket" in e and "by (le" in e and "rate(" in e for e in quantiles)
    for h in HISTOGRAMS:  # p50 and p99 of each
        found = {re.match(r"histogram_quantile\(([\d.]+),", e)[1] for e in quantiles if h in e}
        assert found == {"0.5", "0.99"}, h
