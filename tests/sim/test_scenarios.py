"""Every shipped scenario file validates, and sweeps expand into their points."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ops.sim.config import load_scenarios
from ops.sim.presets import resolve_device, resolve_model

SCENARIOS = sorted((Path(__file__).parents[2] / "ops/sim/scenarios").glob("*.yaml"))


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: p.stem)
def test_scenario_file_loads(path: Path) -> None:
    scenarios, sweep = load_scenarios(path)
    assert scenarios
    for s in scenarios:
        resolve_model(s.model)
        resolve_device(s.device)
    if sweep is not None:
        assert [s.label for s in scenarios] == [p["label"] for p in sweep.points]


def test_unknown_field_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ncluster: {prefill_nodes: 1, decode_nodes: 1, snic_gbs: 4}\n")
    with pytest.raises(ValidationError, match="snic_gbs"):
        load_scenarios(bad)


def test_cli_runs_a_scenario(tmp_path: Path) -> None:
    """`python -m ops sim <file>` end to end on a tiny override: table, JSON and PNG."""
    from ops.cli import main

    rc = main(
        [
            "sim",
            str(SCENARIOS[0].parent / "ds27b-1p1d.yaml"),
            "--no-online",
            "--set",
            "trace.agents=8",
            "--set",
            "trace.window_turns=2",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    assert (tmp_path / "sim-ds27b-1p1d.json").exists()
    assert (tmp_path / "sim-ds27b-1p1d.png").exists()
