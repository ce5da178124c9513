"""A run is a function of its scenario and seed: same seed, same result; new seed, new one."""

from __future__ import annotations

from dataclasses import astuple

from ops.sim.config import Scenario
from ops.sim.runner import run_once
from tests.sim.conftest import small_scenario


def _fingerprint(scenario: Scenario, policy: str = "dualpath_split") -> list[tuple]:
    return [astuple(r) for r in run_once(scenario, policy).records]


def test_same_seed_same_records(scenario: Scenario) -> None:
    assert _fingerprint(scenario) == _fingerprint(scenario)


def test_another_seed_another_run(scenario: Scenario) -> None:
    other = scenario.model_copy(update={"trace": scenario.trace.model_copy(update={"seed": 4})})
    assert _fingerprint(other) != _fingerprint(scenario)


def test_online_arrivals_are_seeded_too() -> None:
    from ops.sim.config import OnlineConfig

    online = small_scenario().model_copy(
        update={"online": OnlineConfig(duration_s=60, warmup_s=10, rate_lo=0.1, rate_hi=1)}
    )
    a = [astuple(r) for r in run_once(online, "dualpath", rate=0.5).records]
    b = [astuple(r) for r in run_once(online, "dualpath", rate=0.5).records]
    assert a == b and len(a) > 10


def test_exact_and_compact_index_agree(scenario: Scenario) -> None:
    """The compact index (a bitmap per agent) answers the policy exactly as kvstore's
    KVIndex does: identical runs."""
    exact = scenario.model_copy(update={"index": "exact"})
    assert _fingerprint(exact, "dualpath") == _fingerprint(scenario, "dualpath")
