"""Storage pieces: the SNIC's dispatch rule, the compact index's contract, write states."""

from __future__ import annotations

import random

import pytest

from kvstore.index import IndexEvent, KVIndex
from ops.sim.events import EventLoop
from ops.sim.storage import READ, WRITE, BlockKeys, BlockWrites, CompactIndex, SimSNIC, block_key


def test_reads_go_first_but_writes_keep_their_share() -> None:
    """Under a continuous read load, WRITEs still get ~min_write_share of the bytes; with
    no contention a write goes at once (kvstore/snic.py's rule)."""
    loop = EventLoop()
    snic = SimSNIC(loop, "n", 100.0, 1e9, min_write_share=0.2)
    order: list[str] = []
    for i in range(50):
        snic.submit(READ, 10, lambda i=i: order.append(f"r{i}"))
        snic.submit(WRITE, 10, lambda i=i: order.append(f"w{i}"))
    loop.run(lambda: False)
    first_60 = order[:60]
    writes = sum(1 for x in first_60 if x.startswith("w"))
    assert 10 <= writes <= 14  # ~20% of the bytes while both queue
    assert order[0] == "r0"
    assert snic.total_bytes == [500, 500] and snic.read_queue_bytes == 0
    assert loop.now == pytest.approx(10.0)  # 1000 bytes at 100 B/s: the link never idles


def test_uncapped_snic_runs_at_its_device_rate() -> None:
    loop = EventLoop()
    snic = SimSNIC(loop, "n", None, 1000.0)
    done: list[float] = []
    snic.submit(READ, 500, lambda: done.append(loop.now))
    loop.run(lambda: False)
    assert done == [0.5]


def test_compact_index_answers_like_kvindex() -> None:
    """Random stores and deletes of agents' blocks: both indexes give the same longest
    prefix (and `locate` length) for every (agent, start, length) query, via BlockKeys and
    its slices and via plain key tuples."""
    rng = random.Random(0)
    exact, compact = KVIndex(), CompactIndex()
    for _ in range(400):
        event = IndexEvent(
            block_key(rng.randrange(5), rng.randrange(40)), "nvme", rng.random() < 0.8
        )
        exact.apply([event])
        compact.apply([event])
    for agent in range(5):
        for n in range(0, 45, 3):
            for start in (0, 1, 7, 30, 44):
                keys = BlockKeys(agent, 45)[start : start + n]
                expected = exact.longest_prefix(tuple(keys))
                assert compact.longest_prefix(keys) == expected
                assert compact.longest_prefix(tuple(keys)) == expected
                assert len(compact.locate(keys)) == len(exact.locate(tuple(keys)))
    assert len(compact) == len(exact)


def test_block_keys_are_a_prefix_chain() -> None:
    assert list(BlockKeys(7, 5)[:3]) == list(BlockKeys(7, 3))
    assert list(BlockKeys(7, 5)[2:4]) == [block_key(7, 2), block_key(7, 3)]
    assert BlockKeys(7, 5)[2:4][-1] == block_key(7, 3)
    assert list(BlockKeys(7, 5)[::2]) == [block_key(7, b) for b in (0, 2, 4)]
    assert BlockKeys(7, 5)[-1] == block_key(7, 4)
    assert len({*BlockKeys(1, 4), *BlockKeys(2, 4)}) == 8


def test_each_block_is_written_once() -> None:
    """A block already stored or with its write under way is not written again: the
    persisted bytes the conservation check counts are each block's once."""
    writes = BlockWrites()
    writes.mark_stored(7, 2)  # a window's earlier context
    assert writes.begin(7, 0, 5) == [2, 3, 4]
    assert writes.begin(7, 3, 6) == [5]  # 3 and 4 are pending
    writes.complete(7, [2, 3, 4])
    assert writes.begin(7, 0, 6) == []
    assert writes.begin(8, 1, 3) == [1, 2]  # another agent's chain: its own states
