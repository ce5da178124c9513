"""AdmissionQueue under saturation, with an injected clock and a gate that admits what the
test releases (one request at a time unless a Capacity says more), so the order is exact."""

from __future__ import annotations

import asyncio
import random

import pytest

from app.admission.capacity import Capacity
from app.admission.queues import AdmissionQueue, Lease, QueueSection, Ticket
from app.api.errors import OverloadedError, RateLimitError, RequestTimeoutError

pytestmark = pytest.mark.anyio


class Clock:
    def __init__(self, t: float = 1_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Calendar:
    """A billing calendar the test sets: `window`, and when peak ends."""

    def __init__(self, window: str = "normal", peak_left_s: float = 0.0):
        self.window, self.peak_left_s = window, peak_left_s

    def window_at(self, t: float) -> str:
        return self.window

    def seconds_until_not(self, t: float, window: str) -> float:
        return self.peak_left_s if window == self.window else 0.0


def make(clock: Clock | None = None, calendar: Calendar | None = None, **config) -> AdmissionQueue:
    return AdmissionQueue(
        QueueSection(**config), calendar or Calendar(), clock or Clock(), tick_s=3600
    )


def ticket(tenant: str, tier: str = "default", prompt: int = 100, out: int = 28, **kw) -> Ticket:
    return Ticket(f"{tenant}-{random.random()}", tenant, tier, prompt, out, **kw)  # type: ignore[arg-type]


class Waiters:
    """Tickets submitted as tasks; `admitted` records the order leases were granted."""

    def __init__(self, queue: AdmissionQueue):
        self.queue = queue
        self.admitted: list[Ticket] = []
        self.leases: list[Lease] = []  # running
        self.history: list[Lease] = []  # every lease granted
        self.tasks: dict[Ticket, asyncio.Task] = {}

    def submit(self, t: Ticket) -> asyncio.Task:
        async def wait() -> Lease:
            lease = await self.queue.admit(t)
            self.admitted.append(t)
            self.leases.append(lease)
            self.history.append(lease)
            return lease

        self.tasks[t] = asyncio.ensure_future(wait())
        return self.tasks[t]

    async def settle(self) -> None:
        for _ in range(5):
            await asyncio.sleep(0)

    async def release_next(self) -> None:
        """End the oldest running request (the gated engine finishes one)."""
        self.leases.pop(0).release()
        await self.settle()


async def test_priority_before_default_before_flex():
    queue = make()
    w = Waiters(queue)
    w.submit(ticket("a"))  # occupies the only slot (no capacity report: one at a time)
    await w.settle()
    order = [ticket("a", "flex"), ticket("a", "default"), ticket("a", "priority")]
    for t in order:
        w.submit(t)
    await w.settle()
    assert len(w.admitted) == 1
    for _ in range(3):
        await w.release_next()
    assert [t.tier for t in w.admitted[1:]] == ["priority", "default", "flex"]


async def test_aging_lets_flex_through_a_stream_of_priority():
    clock = Clock()
    queue = make(clock, tier_offset_s={"priority": 0, "default": 10, "flex": 20})
    w = Waiters(queue)
    w.submit(ticket("p", "priority"))
    await w.settle()
    flex = ticket("f", "flex")
    w.submit(flex)
    served_before_flex = 0
    for _ in range(40):  # a new priority request every second, for ever
        clock.t += 1
        w.submit(ticket("p", "priority"))
        await w.settle()
        await w.release_next()
        if flex in w.admitted:
            break
        served_before_flex += 1
    assert flex in w.admitted
    # its turn (arrival + 20 s) comes before a priority request's arriving 20 s later
    assert 19 <= served_before_flex <= 21


async def test_sustained_overload_keeps_priority_first():
    """A default backlog older than any priority request still waits (within its offset)."""
    clock = Clock()
    queue = make(clock)
    w = Waiters(queue)
    w.submit(ticket("d", "default"))
    await w.settle()
    for _ in range(50):
        w.submit(ticket("d", "default"))
    await w.settle()
    for _ in range(60):  # one admission per second; a priority request every 2 s
        clock.t += 1
        if int(clock.t) % 2 == 0:
            w.submit(ticket("p", "priority"))
            await w.settle()
        await w.release_next()
    prio = [lease for lease in w.history if lease.tier == "priority"]
    assert len(prio) == 30
    assert max(lease.queued_s for lease in prio) <= 1.0  # never behind the older backlog
    assert max(lease.queued_s for lease in w.history if lease.tier == "default") > 30


async def test_equal_tenants_get_equal_token_shares():
    rng = random.Random(7)
    queue = make(quantum_tokens=512)
    w = Waiters(queue)
    w.submit(ticket("warmup"))
    await w.settle()
    # A sends few big requests, B many small ones: shares are by tokens, not requests
    for _ in range(300):
        w.submit(ticket("A", prompt=rng.randint(500, 3000), out=100))
        w.submit(ticket("B", prompt=rng.randint(20, 300), out=20))
    await w.settle()
    tokens = {"A": 0, "B": 0}
    while True:
        await w.release_next()
        t = w.admitted[-1]
        tokens[t.tenant] += t.tokens
        backlog = {x.tenant for x in queue.queues["default"].tickets()}
        if backlog != {"A", "B"}:
            break
    assert sum(tokens.values()) > 100_000
    assert tokens["A"] == pytest.approx(tokens["B"], rel=0.10)


async def test_weights_scale_the_share():
    queue = make(quantum_tokens=256)
    w = Waiters(queue)
    w.submit(ticket("warmup"))
    await w.settle()
    for _ in range(200):
        w.submit(ticket("heavy", prompt=200, out=56, weight=2.0))
        w.submit(ticket("light", prompt=200, out=56, weight=1.0))
    await w.settle()
    for _ in range(150):
        await w.release_next()
    served = [t.tenant for t in w.admitted[1:]]
    assert served.count("heavy") / served.count("light") == pytest.approx(2.0, rel=0.1)


async def test_full_queue_is_503_with_retry_after():
    queue = make(max_queued={"priority": 2, "default": 2, "flex": 2})
    w = Waiters(queue)
    for _ in range(3):
        w.submit(ticket("a"))
    await w.settle()
    with pytest.raises(OverloadedError) as err:
        await queue.admit(ticket("a"))
    assert err.value.status == 503 and err.value.code == "queue_full"
    assert int(err.value.headers["Retry-After"]) >= 1
    w.submit(ticket("a", "priority"))  # other tiers have their own cap
    await w.settle()
    assert queue.depth()["priority"] == 1


async def test_queue_timeout_is_408_and_flex_deadline_429_until_peak_ends():
    clock = Clock()
    calendar = Calendar(window="peak", peak_left_s=1234.2)
    queue = make(clock, calendar, queue_timeout_s=5, flex_deadline_s=60)
    w = Waiters(queue)
    w.submit(ticket("a"))
    await w.settle()
    late = w.submit(ticket("a"))
    flex = w.submit(ticket("a", "flex"))
    await w.settle()
    clock.t += 5
    queue.service()
    await w.settle()
    with pytest.raises(RequestTimeoutError) as err:
        await late
    assert err.value.status == 408 and err.value.code == "queue_timeout"
    assert not flex.done()
    clock.t += 55
    queue.service()
    await w.settle()
    with pytest.raises(RateLimitError) as err:
        await flex
    assert err.value.status == 429 and err.value.code == "flex_deadline"
    assert err.value.headers["Retry-After"] == "1235"
    assert queue.depth() == {"priority": 0, "default": 0, "flex": 0}


async def test_flex_waits_out_the_peak_unless_idle():
    calendar = Calendar(window="peak")
    queue = make(calendar=calendar)
    queue.update_capacity(Capacity(prefill_tokens=10_000, kv_tokens=100_000, seqs=16))
    w = Waiters(queue)
    idle = w.submit(ticket("a", "flex"))
    await w.settle()
    assert idle.done(), "an idle system runs flex even in peak"
    w.submit(ticket("a", "default", prompt=5000))  # load now 0.5 > flex_idle_share
    held = w.submit(ticket("a", "flex"))
    await w.settle()
    assert not held.done()
    calendar.window = "off_peak"
    queue.service()
    await w.settle()
    assert held.done()
    assert w.leases[-1].window == "off_peak"  # billed in the window it ran


async def test_capacity_is_tokens_and_tiers_keep_headroom():
    queue = make(tier_share={"priority": 1.0, "default": 0.5, "flex": 0.25})
    queue.update_capacity(Capacity(prefill_tokens=1000, kv_tokens=100_000, seqs=64))
    w = Waiters(queue)
    for _ in range(8):
        w.submit(ticket("a", prompt=200, out=10))
    await w.settle()
    # the first always runs; then default fills up to 50% of 1000 prefill tokens
    assert len(w.admitted) == 2
    w.submit(ticket("b", "priority", prompt=400))  # priority may use the headroom
    await w.settle()
    assert w.admitted[-1].tier == "priority" and len(w.admitted) == 3
    w.leases[0].prefill_done()  # a prompt left the prefill queue: room for one more
    await w.settle()
    assert len(w.admitted) == 3, "still over default's share (200 + 400 + 200 > 500)"
    w.leases[2].prefill_done()
    await w.settle()
    assert len(w.admitted) == 4
    # reported KV use counts when it is higher than the queue's own
    queue.update_capacity(
        Capacity(prefill_tokens=1000, kv_tokens=100_000, seqs=64, used_kv_tokens=49_900)
    )
    for lease in w.leases:
        lease.prefill_done()
    await w.settle()
    assert len(w.admitted) == 4
    queue.update_capacity(Capacity(prefill_tokens=1000, kv_tokens=100_000, seqs=64))
    await w.settle()
    assert len(w.admitted) == 6  # two more prompts (400 of default's 500 tokens)


async def test_priority_counts_only_priority_prefill_ahead_of_it():
    queue = make(tier_share={"priority": 1.0, "default": 1.0, "flex": 1.0})
    queue.update_capacity(Capacity(prefill_tokens=300, kv_tokens=100_000, seqs=64))
    w = Waiters(queue)
    for tier in ("flex", "default", "default", "priority", "priority"):
        w.submit(ticket("a", tier, prompt=250))
    await w.settle()
    # flex runs (nothing in flight); default has no default/priority prefill ahead; the
    # second default would have 250 ahead (> 300); priority has none; the second has 250
    assert [t.tier for t in w.admitted] == ["flex", "default", "priority"]


async def test_an_idle_prefill_queue_takes_a_prompt_larger_than_its_budget():
    queue = make()
    queue.update_capacity(Capacity(prefill_tokens=100, kv_tokens=100_000, seqs=64))
    w = Waiters(queue)
    for _ in range(3):
        w.submit(ticket("a", prompt=500))
    await w.settle()
    assert len(w.admitted) == 1
    w.leases[0].prefill_done()  # decoding now: the prefill queue is empty again
    await w.settle()
    assert len(w.admitted) == 2, "a budget below one prompt must not serialise requests"


async def test_cancelled_waiter_leaves_at_once_and_nothing_leaks():
    queue = make()
    w = Waiters(queue)
    w.submit(ticket("a"))
    await w.settle()
    gone = w.submit(ticket("a"))
    after = w.submit(ticket("a"))
    await w.settle()
    assert queue.depth()["default"] == 2
    gone.cancel()
    await w.settle()
    assert queue.depth()["default"] == 1 and queue.counts["cancelled"] == 1
    await w.release_next()
    assert after.done() and queue.in_flight.requests == 1


async def test_random_load_admits_each_request_once_and_frees_everything():
    rng = random.Random(3)
    clock = Clock()
    queue = make(
        clock, queue_timeout_s=20, flex_deadline_s=30, tier_offset_s={"default": 5, "flex": 10}
    )
    queue.update_capacity(Capacity(prefill_tokens=3000, kv_tokens=20_000, seqs=8))
    w = Waiters(queue)
    submitted = []
    for _ in range(400):
        clock.t += 0.25
        if rng.random() < 0.7:
            t = ticket(
                rng.choice("abc"),
                rng.choice(["priority", "default", "flex"]),
                prompt=rng.randint(10, 900),
                out=rng.randint(1, 200),
            )
            submitted.append(w.submit(t))
        await w.settle()
        for lease in list(w.leases):
            if rng.random() < 0.3:
                lease.prefill_done()
            if rng.random() < 0.2:
                w.leases.remove(lease)
                lease.release()
        queue.service()
    clock.t += 100  # every deadline passed: what still waits times out
    while w.leases:
        w.leases.pop().release()
        await w.settle()
    outcomes = await asyncio.gather(*submitted, return_exceptions=True)
    ok = [o for o in outcomes if isinstance(o, Lease)]
    failed = [o for o in outcomes if isinstance(o, Exception)]
    assert len(ok) + len(failed) == len(submitted) and ok
    assert len(ok) == queue.counts["admitted"] and len(w.admitted) == len(ok)
    assert all(isinstance(e, (RequestTimeoutError, RateLimitError)) for e in failed)
    flight = queue.in_flight
    assert (flight.requests, flight.prefill_tokens, flight.kv_tokens, flight.seqs) == (0, 0, 0, 0)
