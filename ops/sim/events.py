"""The discrete-event kernel: a clock with a heap of callbacks, links, and shared CPU hosts.

EventLoop   `at(t, fn, *args)` / `after(dt, ...)`; `run()` pops events in time order
            (FIFO among equal times, so a run is deterministic for a seed).
Link        a GPU's compute NIC: a rate and a byte counter.
Host        processor sharing of one CPU host's cores among its busy engines: the
            one-machine emulated cluster runs 3 engine threads on 2 cores, next to the
            rest of the app (`background_cores`). GPU engines have no host.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from typing import Any, Protocol


class EventLoop:
    def __init__(self) -> None:
        self.now = 0.0
        self.num_events = 0
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = itertools.count()

    def at(self, t: float, fn: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._heap, (max(t, self.now), next(self._seq), fn, args))

    def after(self, dt: float, fn: Callable[..., None], *args: Any) -> None:
        self.at(self.now + dt, fn, *args)

    def run(self, stop: Callable[[], bool], until: float = math.inf) -> None:
        """Run events until `stop()` holds (checked after each), the heap empties, or `until`."""
        heap = self._heap
        while heap and not stop():
            t, _, fn, args = heapq.heappop(heap)
            if t > until:
                heapq.heappush(heap, (t, 0, fn, args))
                self.now = until
                return
            self.now = t
            self.num_events += 1
            fn(*args)


class Link:
    """A NIC: its rate, and the bytes that crossed it (transfers over CNICs are modelled as
    delays at this rate, layer-wise overlapped with compute; the paper's bound analysis
    (§4.2) keeps CNICs off the critical path within its P/D limits)."""

    def __init__(self, name: str, bytes_per_s: float):
        self.name = name
        self.bytes_per_s = bytes_per_s
        self.bytes_total = 0


class Shared(Protocol):
    """An engine whose work runs on a Host: told when its share of a core changes."""

    def on_share_change(self, now: float, share: float) -> None: ...


class Host:
    """Processor sharing of a CPU host: busy engines and CPU jobs share `cores` equally, at
    most one core each, with `background_threads` always-runnable threads of the rest of
    the app (Serve replicas, the transports' progress threads) counted as equals.

    Jobs are the host work outside the engine threads: moving KV between the store, DRAM
    and the engines (checksums, object-store puts and gets, transport copies).
    """

    def __init__(self, loop: EventLoop, cores: float, background_threads: float = 0.0):
        self.loop = loop
        self.cores = cores
        self.background_threads = background_threads
        self.busy: dict[int, Shared] = {}
        self._jobs: dict[int, list[Any]] = {}  # id -> [work left (s), callback]
        self._job_ids = itertools.count()
        self._last = 0.0
        self._version = 0
        self.job_s = 0.0  # CPU seconds of jobs submitted

    def share(self) -> float:
        n = len(self.busy) + len(self._jobs)
        return 1.0 if n == 0 else min(1.0, self.cores / (n + self.background_threads))

    def set_busy(self, now: float, engine: Shared, busy: bool) -> float:
        """Mark `engine` busy or idle; re-rates everything else busy. Returns its share."""
        self._advance(now)
        before = self.share()
        if busy:
            self.busy[id(engine)] = engine
        else:
            self.busy.pop(id(engine), None)
        self._rerate(now, before, engine)
        return self.share()

    def run_job(self, work_s: float, done: Callable[[], None]) -> None:
        """Run `work_s` seconds of single-threaded CPU work, then `done()`."""
        now = self.loop.now
        if work_s <= 0:
            self.loop.after(0.0, done)
            return
        self.job_s += work_s
        self._advance(now)
        before = self.share()
        self._jobs[next(self._job_ids)] = [work_s, done]
        self._rerate(now, before, None)

    def _advance(self, now: float) -> None:
        share = self.share()
        for job in self._jobs.values():
            job[0] -= (now - self._last) * share
        self._last = now

    def _rerate(self, now: float, before: float, skip: Shared | None) -> None:
        after = self.share()
        if after != before:
            for other in list(self.busy.values()):
                if other is not skip:
                    other.on_share_change(now, after)
        self._version += 1
        if self._jobs:
            left = min(job[0] for job in self._jobs.values())
            self.loop.at(now + max(0.0, left) / after, self._on_job, self._version)

    def _on_job(self, version: int) -> None:
        if version != self._version:
            return
        now = self.loop.now
        self._advance(now)
        before = self.share()
        done = [jid for jid, job in self._jobs.items() if job[0] <= 1e-9]
        callbacks = [self._jobs.pop(jid)[1] for jid in done]
        self._rerate(now, before, None)
        for callback in callbacks:
            callback()
