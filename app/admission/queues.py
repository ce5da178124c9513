"""The admission queue: which waiting request runs next, and whether it may run now. No Ray;
the clock and the billing calendar are injected.

- Tiers: each waiting request's turn is its arrival time + its tier's offset
  (`tier_offset_s`: priority 0, default 120 s, flex 600 s); the earliest turn goes first.
  That is strict priority for any wait shorter than the offsets' differences (a default
  request goes before a newly arrived priority one only after waiting 120 s, by default
  its queue timeout) and aging beyond it: a flex request waiting 10 minutes overtakes
  everything, so nothing starves for ever (earliest-deadline-first on virtual deadlines).
- Tenants within a tier share by tokens, deficit round robin (DRR): each turn a tenant gets
  `quantum_tokens × weight` of credit and runs requests while its credit covers their
  tokens (prompt + max_tokens, × n).
- Capacity is work, not a request count: a request is admitted while the work in flight
  plus its own stays within the budget: prefill tokens not yet computed (of its own and
  more urgent tiers only: the PE prefills by tier), stored-KV bytes not yet read, decode
  KV tokens and decode batch slots (this queue's own count, or the engines' last reports
  if higher). A prompt's stored prefix is not prefill work: its tokens count against the
  storage read budget (the SNICs' rate × `read_queue_s`), its miss tokens against the
  prefill budget, so agent turns that mostly hit run together while the PE is idle. Each
  tier may fill only its `tier_share`, which keeps headroom for `priority`. A turn holds
  the read budget while it reads and the prefill budget only from then (see Lease): the
  storage stage and the compute stage overlap as in the engines. With nothing in flight
  one request is always admitted, however large.
- `flex` requests are held while the billing window is `peak`, unless the system is idle
  (nothing else waiting, load under `flex_idle_share`); they run in the next non-peak
  window or fail at their deadline with 429 and the time until the peak ends.
- Limits: a full tier queue answers 503; a default/priority request that waits longer than
  `queue_timeout_s` answers 408. A request cancelled while queued (client gone) leaves at
  once. An admitted request is never dropped by the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from app.admission.capacity import Capacity
from app.admission.fair import TierQueue
from app.admission.section import QueueSection
from app.api.errors import OverloadedError, RateLimitError, RequestTimeoutError
from app.auth import TIERS, Tier

RANK: dict[Tier, int] = {"priority": 0, "default": 1, "flex": 2}


class Calendar(Protocol):
    def window_at(self, t: float) -> str: ...

    def seconds_until_not(self, t: float, window: str) -> float: ...


@dataclass(eq=False, slots=True)
class Ticket:
    request_id: str
    tenant: str
    tier: Tier
    prompt_tokens: int
    max_tokens: int
    n: int = 1
    hit_tokens: int = 0  # the prompt's stored prefix (KV read, not computed)
    read_bytes: int = 0  # per choice: stored KV read through an SNIC
    weight: float = 1.0
    arrival: float = 0.0
    deadline: float = math.inf
    future: asyncio.Future[Lease] | None = None
    route: str = ""  # audit only
    user: str | None = None  # the request's `user` field, audit only (masked there)

    @property
    def tokens(self) -> int:
        """What the request may cost: its DRR charge and its KV reservation."""
        return (self.prompt_tokens + self.max_tokens) * self.n

    @property
    def miss_tokens(self) -> int:
        """What the PE computes of one choice: the prompt less its stored prefix."""
        return max(1, self.prompt_tokens - self.hit_tokens)

    @property
    def prefill_tokens(self) -> int:
        return self.miss_tokens * self.n


@dataclass(slots=True)
class InFlight:
    requests: int = 0
    prefill_by_rank: list[int] = field(default_factory=lambda: [0, 0, 0])  # by tier rank
    read_bytes: int = 0  # stored KV admitted and not yet read
    kv_tokens: int = 0
    seqs: int = 0

    @property
    def prefill_tokens(self) -> int:
        """Miss tokens waiting for the PE (reads done) and not yet past their first token."""
        return sum(self.prefill_by_rank)


class Lease:
    """An admitted request's hold on capacity, a pipeline: its stored-KV bytes hold the read
    budget until `read_done` (once per choice); then its miss tokens hold the prefill budget
    (from admission, for a prompt with nothing to read) until `prefill_done` (the first
    token is out); KV tokens and batch slots until `release` (all idempotent). A turn that
    is still reading is not in the PE's queue, so it does not hold the PE's budget."""

    def __init__(self, queue: AdmissionQueue, ticket: Ticket, admitted_at: float, window: str):
        self.queue, self.ticket = queue, ticket
        self.admitted_at, self.window = admitted_at, window
        self.queued_s = admitted_at - ticket.arrival
        self._prefilling = True
        self._reads_left = ticket.n if ticket.read_bytes else 0  # choices still reading
        self._prefill = 0 if ticket.read_bytes else ticket.prefill_tokens  # held in the budget
        self._held = True

    @property
    def tier(self) -> Tier:
        return self.ticket.tier

    @property
    def rank(self) -> int:
        """The PE prefills `priority` before `default` before `flex` (the tier's rank)."""
        return RANK[self.ticket.tier]

    def read_done(self) -> None:
        """One choice's stored-KV read ended: its bytes leave the read budget and its miss
        tokens join the PE's queue."""
        if self._reads_left and self._held:
            self._reads_left -= 1
            tokens = self.ticket.miss_tokens if self._prefilling else 0
            self._prefill += tokens
            self.queue._move(self.rank, -self.ticket.read_bytes, tokens)

    def prefill_done(self) -> None:
        if self._prefilling and self._held:
            self._prefilling = False
            reads, self._reads_left = self._reads_left * self.ticket.read_bytes, 0
            tokens, self._prefill = self._prefill, 0
            self.queue._move(self.rank, -reads, -tokens)

    def release(self) -> None:
        if self._held:
            self.prefill_done()
            self._held = False
            self.queue._release(self.ticket)


class AdmissionQueue:
    def __init__(
        self,
        config: QueueSection,
        calendar: Calendar,
        clock: Callable[[], float],
        tick_s: float = 0.1,
    ):
        self.config = config
        self.calendar = calendar
        self.clock = clock
        self.tick_s = tick_s
        self.queues: dict[Tier, TierQueue] = {t: TierQueue(config.quantum_tokens) for t in TIERS}
        self.capacity: Capacity | None = None
        self.in_flight = InFlight()
        self.deadlines: list[tuple[float, int, Ticket]] = []
        self.seq = itertools.count()
        self.admitted: deque[float] = deque()  # admission times in the last minute
        self.counts = {"admitted": 0, "queue_full": 0, "timeout": 0, "cancelled": 0}
        self._timer: asyncio.Task[None] | None = None
        self._servicing = False

    # ------------------------------------------------------------------ callers
    async def admit(self, ticket: Ticket) -> Lease:
        """Wait for the ticket's turn and capacity; raise 503/408/429 if it cannot run."""
        now = self.clock()
        ticket.arrival = now
        flex = ticket.tier == "flex"
        ticket.deadline = now + (
            self.config.flex_deadline_s if flex else self.config.queue_timeout_s
        )
        queue = self.queues[ticket.tier]
        if len(queue) >= self.config.max_queued[ticket.tier]:
            self.counts["queue_full"] += 1
            raise OverloadedError(
                f"the {ticket.tier} queue is full ({len(queue)} requests waiting)",
                code="queue_full",
                headers={"Retry-After": str(self._retry_after(len(queue)))},
            )
        ticket.future = asyncio.get_running_loop().create_future()
        queue.push(ticket)
        heapq.heappush(self.deadlines, (ticket.deadline, next(self.seq), ticket))
        self._ensure_timer()
        self.service()
        try:
            return await ticket.future
        except asyncio.CancelledError:
            future = ticket.future
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().release()  # admitted as the caller left: give it back
            elif self.queues[ticket.tier].remove(ticket):
                self.counts["cancelled"] += 1
                self.service()
            raise

    def update_capacity(self, capacity: Capacity | None) -> None:
        self.capacity = capacity
        self.service()

    def service(self) -> None:
        """Expire deadlines, then admit while the next request in order fits."""
        if self._servicing:
            return  # a release inside the loop below: the loop goes on by itself
        self._servicing = True
        try:
            now = self.clock()
            self._expire(now)
            while (ticket := self._next(now)) is not None and self._fits(ticket, now):
                self.queues[ticket.tier].remove(ticket, served=True)
                self._start(ticket, now)
        finally:
            self._servicing = False

    def depth(self) -> dict[str, int]:
        return {tier: len(q) for tier, q in self.queues.items()}

    # ------------------------------------------------------------------ order
    def _next(self, now: float) -> Ticket | None:
        best: tuple[float, int] | None = None
        choice: Ticket | None = None
        for tier in TIERS:
            queue = self.queues[tier]
            if not queue:
                continue
            if tier == "flex" and self._flex_held(now):
                continue
            key = (queue.oldest() + self.config.tier_offset_s[tier], RANK[tier])
            if best is None or key < best:
                best, choice = key, queue.peek()
        return choice

    def _tier_now(self, ticket: Ticket, now: float) -> Tier:
        """The most urgent tier a new request would have to be in to go before this one."""
        turn = ticket.arrival + self.config.tier_offset_s[ticket.tier]
        return next(
            t for t in TIERS if turn <= now + self.config.tier_offset_s[t] or t == ticket.tier
        )

    def _flex_held(self, now: float) -> bool:
        if self.calendar.window_at(now) != "peak":
            return False
        if len(self.queues["priority"]) or len(self.queues["default"]):
            return True
        return self._load() >= self.config.flex_idle_share

    def _load(self) -> float:
        """The busiest of the three capacity dimensions, as a fraction."""
        cap = self.capacity
        if cap is None:
            return 1.0 if self.in_flight.requests else 0.0
        used = self._used()
        return max(
            used[0] / max(cap.prefill_tokens, 1.0),
            used[1] / max(cap.kv_tokens, 1.0),
            used[2] / max(cap.seqs, 1),
        )

    def _used(self) -> tuple[int, int, int]:
        cap, mine = self.capacity, self.in_flight
        if cap is None:
            return mine.prefill_tokens, mine.kv_tokens, mine.seqs
        return (
            max(mine.prefill_tokens, cap.used_prefill_tokens),
            max(mine.kv_tokens, cap.used_kv_tokens),
            max(mine.seqs, cap.used_seqs),
        )

    def _fits(self, ticket: Ticket, now: float) -> bool:
        if self.in_flight.requests == 0:
            return True  # always make progress, whatever the request's size
        cap = self.capacity
        if cap is None:
            return False  # no engine report yet: one request at a time
        share = self.config.tier_share[self._tier_now(ticket, now)]
        _, kv, seqs = self._used()
        # NOTE: reads are FIFO on an SNIC (not by tier), so all reads in flight are ahead
        reads = max(self.in_flight.read_bytes, cap.used_read_bytes)
        read_bytes = ticket.read_bytes * ticket.n
        # NOTE: the PE prefills by tier, so a request waits only behind prompts of its own
        # or a more urgent tier: that is the work its budget counts. With none of those in
        # flight any prompt goes (a budget below one prompt must not serialise the PE).
        ahead = sum(self.in_flight.prefill_by_rank[: RANK[ticket.tier] + 1])
        return (
            (ahead == 0 or ahead + ticket.prefill_tokens <= cap.prefill_tokens * share)
            and (reads == 0 or not read_bytes or reads + read_bytes <= cap.read_bytes * share)
            and kv + ticket.tokens <= cap.kv_tokens * share
            and seqs + ticket.n <= cap.seqs * share
        )

    # ------------------------------------------------------------------ bookkeeping
    def _start(self, ticket: Ticket, now: float) -> None:
        flight = self.in_flight
        flight.requests += 1
        lease = Lease(self, ticket, now, self.calendar.window_at(now))
        flight.prefill_by_rank[RANK[ticket.tier]] += lease._prefill
        flight.read_bytes += ticket.read_bytes * ticket.n
        flight.kv_tokens += ticket.tokens
        flight.seqs += ticket.n
        self.counts["admitted"] += 1
        self.admitted.append(now)
        assert ticket.future is not None
        if ticket.future.done():  # cancelled in the same loop iteration
            lease.release()
        else:
            ticket.future.set_result(lease)

    def _move(self, rank: int, read_bytes: int, prefill_tokens: int) -> None:
        """A lease's work moved between the read and the prefill budget (or left both)."""
        self.in_flight.read_bytes += read_bytes
        self.in_flight.prefill_by_rank[rank] += prefill_tokens
        self.service()

    def _release(self, ticket: Ticket) -> None:
        flight = self.in_flight
        flight.requests -= 1
        flight.kv_tokens -= ticket.tokens
        flight.seqs -= ticket.n
        self.service()

    def _expire(self, now: float) -> None:
        while self.deadlines and self.deadlines[0][0] <= now:
            _, _, ticket = heapq.heappop(self.deadlines)
            if not self.queues[ticket.tier].remove(ticket):
                continue  # admitted or gone already
            self.counts["timeout"] += 1
            assert ticket.future is not None
            if not ticket.future.done():
                ticket.future.set_exception(self._timeout_error(ticket, now))

    def _timeout_error(self, ticket: Ticket, now: float) -> Exception:
        waited = now - ticket.arrival
        if ticket.tier == "flex":
            until = self.calendar.seconds_until_not(now, "peak")
            retry = self._retry_after(0) if until == 0 or math.isinf(until) else math.ceil(until)
            return RateLimitError(
                f"flex request not started within its {waited:.0f}s deadline (peak hours "
                "or no idle capacity); retry after the peak window",
                code="flex_deadline",
                headers={"Retry-After": str(max(1, retry))},
            )
        return RequestTimeoutError(
            f"request waited {waited:.0f}s in the {ticket.tier} queue without capacity",
            code="queue_timeout",
            headers={"Retry-After": str(self._retry_after(len(self.queues[ticket.tier])))},
        )

    def _retry_after(self, waiting: int) -> int:
        """Seconds until `waiting` requests would have been admitted at the recent rate."""
        now = self.clock()
        while self.admitted and self.admitted[0] < now - 60:
            self.admitted.popleft()
        rate = len(self.admitted) / 60.0
        if rate <= 0:
            return 5
        return max(1, min(60, math.ceil(waiting / rate)))

    # ------------------------------------------------------------------ timer
    def _ensure_timer(self) -> None:
        if self._timer is None or self._timer.done():
            self._timer = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        """Deadlines and window changes need no event to be noticed."""
        while any(self.queues.values()):
            await asyncio.sleep(self.tick_s)
            self.service()

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
