"""Roster: which engine replicas the Scheduler still lists, as the Ingress's capacity poll
last saw them. A call routed to a replica whose Ray node died can wait forever in Serve's
router (no replica of that deployment is left to take it); the request path asks the roster
instead, and moves the request once its replica has left. Pure: callers pass `now`."""

from __future__ import annotations

from collections.abc import Iterable


class Roster:
    """A replica has *left* once it has been missing from every snapshot for `grace_s`
    (a restarted Scheduler relearns its engines within a report interval), judged only
    while the snapshots are fresh (younger than `fresh_s`: the poll is running)."""

    def __init__(self, grace_s: float = 1.0, fresh_s: float = 2.0):
        self.grace_s = grace_s
        self.fresh_s = fresh_s
        self._seen: set[str] = set()
        self._missing_since: dict[str, float] = {}
        self._updated_at: float | None = None

    def update(self, replica_ids: Iterable[str], now: float) -> None:
        current = set(replica_ids)
        for replica_id in self._seen - current:
            self._missing_since.setdefault(replica_id, now)
        for replica_id in current:
            self._missing_since.pop(replica_id, None)
        self._seen |= current
        self._updated_at = now

    def left(self, replica_id: str, now: float) -> bool:
        if self._updated_at is None or now - self._updated_at > self.fresh_s:
            return False  # no fresh view: do not judge
        since = self._missing_since.get(replica_id)
        return since is not None and now - since >= self.grace_s
