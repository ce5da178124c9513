"""When to speculate: the goodput comparison of engine/spec/policy.py, without an engine."""

from __future__ import annotations

import pytest

from engine.spec.policy import REFRESH_STEPS, Candidate, SpecPolicy, SpecStats, StepCostTable


def policy_with_costs(costs: dict[int, float], max_tokens: int = 6) -> SpecPolicy:
    policy = SpecPolicy(max_tokens)
    for rows, seconds in costs.items():
        policy.observe_step(rows, seconds)
    return policy


def cand(key: str, accepted: int, rejected: int, room: int = 6) -> Candidate:
    return Candidate(key, accepted, rejected, room)


def test_cheap_rows_and_good_acceptance_draft_deep():
    """Memory-bound: 8 rows cost 20 % more than 1; a sequence accepting 90 % drafts all 6."""
    policy = policy_with_costs({1: 0.010, 8: 0.012})
    assert policy.allocate([cand("a", 90, 10)], base_rows=1) == {"a": 6}


def test_expensive_rows_or_poor_acceptance_draft_nothing():
    """Compute-bound (rows cost in proportion) or a sequence whose drafts are rejected."""
    compute_bound = policy_with_costs({32: 0.058, 40: 0.0725, 64: 0.116})
    cands = [cand(str(i), 60, 40) for i in range(32)]
    assert compute_bound.allocate(cands, base_rows=32) == {}
    cheap = policy_with_costs({1: 0.010, 8: 0.012})
    assert cheap.allocate([cand("a", 1, 60)], base_rows=1) == {}


def test_the_better_sequence_gets_the_rows():
    """Rows go to the highest expected value first: the sequence that accepts more."""
    policy = policy_with_costs({2: 0.010, 4: 0.0115, 8: 0.030})
    out = policy.allocate([cand("good", 95, 5), cand("poor", 30, 70)], base_rows=2)
    assert out.get("good", 0) > out.get("poor", 0)
    assert out.get("good", 0) >= 2


def test_max_rows_caps_the_step():
    """A quantised engine: drafts never take a step past the kernel hand-over row count."""
    policy = policy_with_costs({3: 0.010, 4: 0.0105, 8: 0.012})
    out = policy.allocate([cand(k, 90, 5) for k in "abc"], base_rows=3, max_rows=8)
    assert sum(out.values()) <= 5
    assert set(out) == {"a", "b", "c"}  # shared, not all to one


def test_unmeasured_base_or_stale_base_is_measured_first():
    policy = policy_with_costs({4: 0.01})
    assert policy.allocate([cand("a", 90, 1)], base_rows=1) == {}  # never ran 1 row plain
    policy.observe_step(1, 0.010)
    assert policy.allocate([cand("a", 90, 1)], base_rows=1)
    for _ in range(REFRESH_STEPS):
        policy.observe_step(5, 0.011)  # speculating steps only
    assert policy.allocate([cand("a", 90, 1)], base_rows=1) == {}  # time to re-measure


def test_not_adaptive_drafts_the_room():
    policy = SpecPolicy(4, adaptive=False)
    assert policy.allocate([cand("a", 0, 50, room=3), cand("b", 0, 0, room=9)], 2) == {
        "a": 3,
        "b": 4,
    }


def test_new_sequences_start_from_the_engine_wide_acceptance():
    policy = SpecPolicy(6)
    fresh = cand("new", 0, 0)
    neutral = policy.alpha(fresh)
    for _ in range(20):
        policy.observe_verify(drafted=6, accepted=6)
    assert policy.alpha(fresh) > neutral
    assert policy.alpha(cand("bad", 0, 30)) < 0.2


def test_cost_table_interpolates_and_extrapolates():
    table = StepCostTable()
    table.observe(1, 0.010)
    assert table.predict(3) == pytest.approx(0.010 * (1 + 2 * 0.05))  # prior slope
    table.observe(5, 0.030)
    assert table.predict(3) == pytest.approx(0.020)
    assert table.predict(7) == pytest.approx(0.040)  # the measured slope beats the prior
    table.observe(5, 0.040)  # an EMA, not the latest value
    assert 0.030 < table.predict(5) < 0.040


def test_stats_rates():
    stats = SpecStats()
    assert stats.acceptance_rate == 0 and stats.mean_accepted_length == 0
    stats.record(drafted=6, accepted=3, emitted=4)
    stats.record(drafted=4, accepted=0, emitted=1)
    assert stats.acceptance_rate == pytest.approx(0.3)
    assert stats.mean_accepted_length == pytest.approx(2.5)
