"""The Scheduler's planned work in the simulator: kept until a report names the request.

The live ClusterView charges a plan to its PE, DE and read SNICs until the engine's report
names the request in `arrived_ids` (the node's in `started_ids`). The simulated engines and
nodes report like the live ones, so no plan is forgotten early, counted twice, or left to
the TTL; `forgetful_view` emulates the view before the fix for the what-if.
"""

from __future__ import annotations

import math

from deployments.protocol import ARRIVED_WINDOW_S, LoadReport, RecentIds
from ops.sim.cluster import SimCluster
from ops.sim.config import Scenario
from ops.sim.engines import PrefillTask
from ops.sim.metrics import TurnRecord
from ops.sim.runner import build_agents, check_conservation, run_once
from tests.sim.conftest import small_scenario


def test_recent_ids_name_the_last_window_once_each() -> None:
    """An id is named from when it is first noted until `window_s` later, then never again:
    the reports' arrived_ids / started_ids window (ARRIVED_WINDOW_S)."""
    ids = RecentIds(10.0)
    ids.note("a", 0.0)
    ids.note("b", 4.0)
    ids.note("a", 5.0)  # noted again: still named from its first time
    assert ids.within(10.0) == ("a", "b")
    assert ids.within(10.5) == ("b",)
    assert ids.within(14.0) == ("b",)
    assert ids.within(14.5) == ()


def test_engine_report_names_what_it_took_in(scenario: Scenario) -> None:
    """A PE's report counts a submitted prompt and names its request for ARRIVED_WINDOW_S."""
    cluster = SimCluster(scenario, "dualpath")
    pe = next(iter(cluster.prefill.values()))
    record = TurnRecord(7, 0, 0.0, 1000, 8, request_id="7-0")
    pe.submit(PrefillTask(record, 1000, 0, 0.0, 0.0, lambda task: None))
    report = pe.load_report(0.0)
    assert report.arrived_ids == ("7-0",) and report.num_queued_tokens == 1000
    assert pe.load_report(ARRIVED_WINDOW_S).arrived_ids == ("7-0",)
    assert pe.load_report(ARRIVED_WINDOW_S + 0.01).arrived_ids == ()


def _spy_run(scenario: Scenario) -> tuple[SimCluster, list[bool]]:
    """Run `scenario` (dualpath, no TTL) recording, for every request that reaches a PE or
    a DE, whether the view still held its plan there; and check every report against the
    view: a request the report counts is no longer planned there (no double count)."""
    cluster = SimCluster(scenario, "dualpath")
    cluster.view.planned_ttl_s = math.inf  # a leak must show, not expire
    held: list[bool] = []
    for engine in (*cluster.prefill.values(), *cluster.decode.values()):

        def submit(task, engine=engine, original=engine.submit) -> None:
            planned = cluster.view.engines[engine.replica_id].planned
            held.append(task.record.request_id in planned.amount)
            original(task)

        engine.submit = submit  # type: ignore[method-assign]
    update = cluster.view.update

    def checked_update(report: LoadReport, now: float | None = None) -> None:
        update(report, now)
        engine = cluster.prefill.get(report.replica_id) or cluster.decode[report.replica_id]
        running = engine.running.values() if isinstance(engine.running, dict) else engine.running
        tasks = [*engine.waiting, *running]
        planned = cluster.view.engines[report.replica_id].planned.amount
        assert not [t for t in tasks if t.record.request_id in planned]

    cluster.view.update = checked_update  # type: ignore[method-assign]
    result = cluster.run(build_agents(scenario))
    check_conservation(result)
    return cluster, held


def test_planned_work_stays_until_the_request_reaches_its_engine(scenario: Scenario):
    """Every request finds its plan still charged to its PE and its DE when it gets there
    (seconds after the plan: reads, prefill, KV transfer), and the reports that name it
    retire it: at the end no plan is left in the view for the TTL to clean up."""
    cluster, held = _spy_run(scenario)
    assert len(held) == 2 * len(cluster.records) and all(held)
    engines, nodes = cluster.view.engines.values(), cluster.view.nodes.values()
    assert all(len(e.planned) == 0 for e in engines)
    assert all(len(n.planned) == 0 for n in nodes)


def test_forgetful_view_drops_plans_before_they_land(scenario: Scenario) -> None:
    """The what-if of the view before the fix: most requests reach an engine whose plan for
    them has already left the view; the live view forgets none, and the runs differ."""
    before = run_once(small_scenario(snic_gbps=10.0, forgetful_view=True), "dualpath")
    live = run_once(scenario, "dualpath")
    assert before.extra["forgotten_frac"] > 0.5
    assert live.extra["forgotten_frac"] == 0.0
    assert before.extra["planned_left"] == live.extra["planned_left"] == 0
    assert [r.decode_replica for r in before.records] != [r.decode_replica for r in live.records]
