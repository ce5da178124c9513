"""The simulator runs the live scheduler policy module itself, not a copy of it."""

from __future__ import annotations

import pytest

import deployments.scheduler.policy as live_policy
from ops.sim import cluster as sim_cluster
from ops.sim.config import Scenario
from ops.sim.metrics import summarize
from ops.sim.runner import run_once


def test_the_simulator_imports_the_live_module() -> None:
    assert sim_cluster.live_policy is live_policy


def test_every_turn_is_planned_by_plan_and_note(scenario: Scenario, monkeypatch) -> None:
    """One live plan_and_note call per turn, with the live PolicyConfig type."""
    calls = []
    real = live_policy.plan_and_note

    def spy(request, view, now, config=None):
        calls.append((request.request_id, type(config)))
        return real(request, view, now, config)

    monkeypatch.setattr(live_policy, "plan_and_note", spy)
    result = run_once(scenario, "dualpath")
    assert len(calls) == len(result.records)
    assert {cfg for _, cfg in calls} == {live_policy.PolicyConfig}


def test_a_change_to_the_policy_changes_the_simulation(scenario: Scenario, monkeypatch):
    """Patch the live read-side choice to 'always the PE side': the simulated DualPath run
    then reads like single-path (every read on the PE nodes) and its output changes."""
    before = summarize(run_once(scenario, "dualpath"))
    assert "de" in before["read_paths"]
    # the fewest leading blocks the decode side may read: none in the simulator (no DRAM tier)
    monkeypatch.setattr(live_policy._ReadSides, "choose", lambda sides, view, cfg: sides.lo)
    after = summarize(run_once(scenario, "dualpath"))
    assert "de:" not in after["read_paths"] and "split:" not in after["read_paths"]
    assert after["snic_bytes"] != before["snic_bytes"]
    assert after["jct_s"] != before["jct_s"]
    decode_nodes = [n for n in after["snic_bytes"] if n.startswith("d")]
    result = run_once(scenario, "dualpath")
    assert all(n.bytes_read == 0 for n in result.nodes if n.node_id in decode_nodes)


@pytest.mark.parametrize("name", ["_pick_prefill", "_pick_decode"])
def test_engine_choice_comes_from_the_policy(scenario: Scenario, monkeypatch, name) -> None:
    """Pin the live PE (or DE) choice to the first engine: every turn lands there."""
    original = getattr(live_policy, name)

    def first(engines, *args):
        original(engines, *args)
        return engines[0]

    monkeypatch.setattr(live_policy, name, first)
    result = run_once(scenario, "dualpath")
    attr = "prefill_replica" if name == "_pick_prefill" else "decode_replica"
    assert len({getattr(r, attr) for r in result.records}) == 1
