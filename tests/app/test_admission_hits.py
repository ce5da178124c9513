"""Admission that understands stored-KV hits: a prompt's stored prefix is read, not
computed, so it counts against the storage read budget and only its miss tokens against
the prefill budget (issue 19: agent turns were admitted one at a time, so the SNIC queues
were always empty when the Scheduler planned and DualPath had nothing to balance)."""

from __future__ import annotations

import pytest

from app.admission.capacity import Capacity
from deployments.protocol import LoadReport, ReadCapacity
from tests.app.test_admission_queue import Waiters, make, ticket

pytestmark = pytest.mark.anyio

MB = 1_000_000
# a PE measured at ~190 tok/s with the default 2 s budget, and three 12 MB/s SNICs x 6 s
CAPACITY = Capacity(prefill_tokens=380, kv_tokens=1_000_000, seqs=64, read_bytes=216 * MB)


def agent_turn(name: str, hit: int = 640, prompt: int = 703, read_mb: int = 29):
    return ticket(name, prompt=prompt, out=8, hit_tokens=hit, read_bytes=read_mb * MB)


async def test_mostly_stored_turns_are_admitted_together_while_the_pe_is_idle():
    queue = make()
    queue.update_capacity(CAPACITY)
    waiters = Waiters(queue)
    turns = [agent_turn(f"agent{i}") for i in range(4)]
    for t in turns:
        waiters.submit(t)
    await waiters.settle()
    # 4 x 63 miss tokens fit the 380-token prefill budget, 4 x 29 MB the read budget;
    # charged as whole prompts (4 x 703 tokens) only the first would run
    assert waiters.admitted == turns
    # while they read they are not in the PE's queue; each read done moves its miss tokens
    assert (queue.in_flight.read_bytes, queue.in_flight.prefill_tokens) == (4 * 29 * MB, 0)
    for lease in waiters.leases:
        lease.read_done()
    assert (queue.in_flight.read_bytes, queue.in_flight.prefill_tokens) == (0, 4 * 63)


async def test_a_reading_turn_holds_the_prefill_budget_only_once_its_read_is_done():
    """Storage and compute overlap: turns still reading do not keep a cold prompt off an
    idle PE, but once their KV is read their miss tokens are the PE's queue."""
    queue = make()
    queue.update_capacity(CAPACITY)
    waiters = Waiters(queue)
    reading = agent_turn("agent", hit=640, prompt=1000)  # 360 miss tokens after its read
    cold, colder = ticket("cold", prompt=200, out=8), ticket("colder", prompt=100, out=8)
    for t in (reading, cold):
        waiters.submit(t)
    await waiters.settle()
    assert waiters.admitted == [reading, cold]  # the PE holds only the cold prompt
    waiters.leases[0].read_done()  # 360 + 200 tokens now wait for the PE: 100 more do not fit
    waiters.submit(colder)
    await waiters.settle()
    assert waiters.admitted == [reading, cold]
    waiters.leases[0].prefill_done()
    await waiters.settle()
    assert waiters.admitted == [reading, cold, colder]


async def test_a_miss_heavy_turn_still_waits_for_prefill_budget():
    queue = make()
    queue.update_capacity(CAPACITY)
    waiters = Waiters(queue)
    cold = [ticket(f"cold{i}", prompt=300, out=8) for i in range(2)]
    for t in cold:
        waiters.submit(t)
    await waiters.settle()
    assert waiters.admitted == cold[:1]  # 300 + 300 tokens of prefill > 380
    waiters.leases[0].prefill_done()  # its prompt left the PE's queue
    await waiters.settle()
    assert waiters.admitted == cold


async def test_reads_beyond_the_read_budget_wait_until_a_read_ends():
    queue = make()
    queue.update_capacity(CAPACITY)
    waiters = Waiters(queue)
    turns = [agent_turn(f"agent{i}", read_mb=80) for i in range(3)]
    for t in turns:
        waiters.submit(t)
    await waiters.settle()
    # 240 MB would exceed default's share (0.85) of 216 MB of queued reads
    assert waiters.admitted == turns[:2]
    waiters.leases[0].read_done()  # its KV is read; its prefill may still be queued
    await waiters.settle()
    assert waiters.admitted == turns
    assert queue.in_flight.read_bytes == 160 * MB
    waiters.leases[1].prefill_done()  # a first token: its read is over too
    waiters.leases[0].release()
    await waiters.settle()
    assert queue.in_flight.read_bytes == 80 * MB  # released once each, never twice


async def test_the_snics_reported_queue_counts_as_reads_ahead():
    """Another ingress replica's reads (seen in the SNICs' reports) fill the budget too."""
    queue = make()
    busy = Capacity(380, 1_000_000, 64, read_bytes=216 * MB, used_read_bytes=200 * MB)
    queue.update_capacity(busy)
    waiters = Waiters(queue)
    first, second = agent_turn("a"), agent_turn("b")
    waiters.submit(first)
    await waiters.settle()
    waiters.submit(second)
    await waiters.settle()
    assert waiters.admitted == [first]


def test_read_capacity_comes_from_the_read_side_rates():
    pe = LoadReport("pe", "prefill", "p", 0, 0, 0, 10, 10, 64, 64, 0.0, prefill_tokens_per_s=190)
    de = LoadReport("de", "decode", "d", 0, 0, 0, 10, 10, 64, 64, 0.0)
    reads = ReadCapacity(bytes_per_s=36 * MB, queued_bytes=5 * MB)
    cap = Capacity.from_reports([pe, de], 2.0, 1000.0, reads, read_queue_s=6.0)
    assert cap is not None
    assert (cap.prefill_tokens, cap.read_bytes, cap.used_read_bytes) == (380, 216 * MB, 5 * MB)
    uncapped = Capacity.from_reports([pe, de], 2.0, 1000.0)
    assert uncapped is not None and uncapped.read_bytes == float("inf")
