"""The Scheduler's pure plan policy over a ClusterView (no Ray, no clock)."""

from __future__ import annotations

import pytest

from deployments.protocol import LoadReport, PlanRequest
from deployments.scheduler.policy import NoEngineAvailable, plan, plan_and_note
from deployments.scheduler.view import ClusterView


def report(rid, role, *, queued=0, running=0, free=100, t=0.0, block=64):
    return LoadReport(
        replica_id=rid,
        role=role,
        node_id="n0",
        num_queued_tokens=queued,
        num_running=running,
        num_waiting=0,
        num_free_blocks=free,
        num_total_blocks=100,
        block_size=block,
        max_num_seqs=64,
        timestamp_s=t,
    )


def view_of(*reports, stale_after_s=10.0):
    view = ClusterView(stale_after_s)
    for r in reports:
        view.update(r)
    return view


def test_picks_least_queued_prefill_and_least_busy_decode():
    view = view_of(
        report("pe0", "prefill", queued=500),
        report("pe1", "prefill", queued=20),
        report("de0", "decode", running=9),
        report("de1", "decode", running=2),
    )
    p = plan(PlanRequest("r", 100, 50), view, now=1.0)
    assert (p.prefill_replica, p.decode_replica) == ("pe1", "de1")


def test_decode_needs_room_for_prompt_plus_max_tokens():
    view = view_of(
        report("pe0", "prefill"),
        report("de-small", "decode", running=0, free=2),  # 128 tokens of room
        report("de-big", "decode", running=5, free=50),
    )
    assert plan(PlanRequest("r", 100, 100), view, 0.0).decode_replica == "de-big"
    assert plan(PlanRequest("r", 10, 10), view, 0.0).decode_replica == "de-small"


def test_when_no_decode_has_room_the_one_with_most_free_blocks_queues_it():
    view = view_of(
        report("pe0", "prefill"), report("de0", "decode", free=3), report("de1", "decode", free=5)
    )
    assert plan(PlanRequest("r", 5000, 100), view, 0.0).decode_replica == "de1"


def test_missing_or_stale_engines_raise():
    with pytest.raises(NoEngineAvailable, match="prefill"):
        plan(PlanRequest("r", 10, 10), view_of(report("de0", "decode")), 0.0)
    view = view_of(report("pe0", "prefill", t=0.0), report("de0", "decode", t=0.0))
    with pytest.raises(NoEngineAvailable):
        plan(PlanRequest("r", 10, 10), view, now=60.0)


def test_burst_between_reports_is_spread_over_replicas():
    view = view_of(
        report("pe0", "prefill"),
        report("pe1", "prefill"),
        report("de0", "decode"),
        report("de1", "decode"),
    )
    plans = [plan_and_note(PlanRequest(f"r{i}", 300, 100), view, 0.0) for i in range(4)]
    assert sorted(p.prefill_replica for p in plans) == ["pe0", "pe0", "pe1", "pe1"]
    assert sorted(p.decode_replica for p in plans) == ["de0", "de0", "de1", "de1"]
    view.update(report("pe0", "prefill"))  # a fresh report replaces the estimate
    assert view.engines["pe0"].queued_tokens == 0
