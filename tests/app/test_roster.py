"""The Ingress's roster of engine replicas (issue 24): a replica missing from the
Scheduler's snapshots for the grace period has left (its node died); nothing is judged on
a stale view, and a replica that reappears is back."""

from __future__ import annotations

from app.roster import Roster


def test_a_replica_leaves_after_the_grace_period_and_can_come_back():
    roster = Roster(grace_s=1.0, fresh_s=2.0)
    roster.update(["pe", "de"], 0.0)
    assert not roster.left("de", 0.0)
    roster.update(["pe"], 0.5)  # the Scheduler dropped it
    assert not roster.left("de", 1.0)  # within the grace period
    roster.update(["pe"], 1.5)
    assert roster.left("de", 1.5)
    roster.update(["pe", "de"], 1.6)
    assert not roster.left("de", 1.6)


def test_no_judgement_on_a_stale_view_or_an_unknown_replica():
    roster = Roster(grace_s=1.0, fresh_s=2.0)
    assert not roster.left("de", 0.0)  # never polled
    roster.update(["pe", "de"], 0.0)
    roster.update(["pe"], 0.1)
    assert roster.left("de", 1.5)
    assert not roster.left("de", 5.0)  # the poll stopped: the view is stale
    assert not roster.left("never-seen", 1.5)
