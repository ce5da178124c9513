"""A block whose NVMe write still waits on a busy SNIC is served from the writer node's
write buffer, and the cluster index knows it is there (issue 19: DualPath lost hits when
turns arrived before their blocks reached NVMe). No Ray; real files."""

from __future__ import annotations

import threading

import torch

from kvstore.index import KVIndex
from kvstore.snic import IOClass, StorageNIC
from kvstore.store import TieredStore
from kvstore.tiers.dram import DRAMTier
from kvstore.tiers.nvme import NVMeTier
from tests.kvstore.test_store import NBYTES, bits, block, key


def stalled_store(tmp_path, dram_blocks: int = 0) -> tuple[TieredStore, threading.Event]:
    """A store whose single SNIC worker is held by an op until the event is set, so every
    write queues (as behind a stream of on-path reads)."""
    store = TieredStore(
        "dnode",
        DRAMTier(dram_blocks * NBYTES, NBYTES),
        NVMeTier(tmp_path / "nvme", fsync=False),
        StorageNIC("dnode", num_workers=1),
        wrap=lambda t: t.clone(),
        unwrap=lambda t: t,
        block_size=16,
        block_nbytes=NBYTES,
    )
    gate = threading.Event()
    store.snic.submit(IOClass.READ, 0, gate.wait)
    return store, gate


def test_a_block_pending_its_write_is_served_from_the_buffer_without_the_snic(tmp_path):
    store, gate = stalled_store(tmp_path)  # no DRAM tier at all, like the benchmark's
    want = [block(i) for i in range(3)]
    for i, b in enumerate(want):
        assert store.persist(key(i), b)
    index = KVIndex()
    index.apply(store.drain_events())
    # announced as held in this node's DRAM: readable here, not from another node
    assert index.longest_prefix([key(i) for i in range(3)], nodes={"dnode"}) == 3
    assert index.longest_prefix([key(i) for i in range(3)], nodes={"pnode"}) == 0
    got = store.load([key(i) for i in range(3)])
    assert [torch.equal(bits(g), bits(w)) for g, w in zip(got, want, strict=True)] == [True] * 3
    assert store.counters["blocks_from_write_buffer"] == 3
    assert store.snic.metrics().bytes_read_total == 0
    gate.set()
    store.flush()
    index.apply(store.drain_events())
    # written: on NVMe for every node, and no longer claimed by this node's DRAM
    entry = index.entries[key(0)]
    assert entry.on_nvme and entry.dram_nodes == set()
    assert store.stats()["write_buffer_blocks"] == 0
    assert len(store.load([key(0)])) == 1 and store.counters["blocks_from_nvme"] == 1
    store.snic.close()


def test_a_block_also_in_the_dram_tier_stays_announced_after_its_write(tmp_path):
    store, gate = stalled_store(tmp_path, dram_blocks=4)
    store.persist(key(0), block(0))
    gate.set()
    store.flush()
    index = KVIndex()
    index.apply(store.drain_events())
    assert index.entries[key(0)].dram_nodes == {"dnode"}  # still in the DRAM tier
    assert index.entries[key(0)].on_nvme
    store.snic.close()


def test_a_full_resync_includes_buffered_blocks(tmp_path):
    store, gate = stalled_store(tmp_path)
    store.persist(key(7), block(7))
    index = KVIndex()
    index.apply(store.snapshot_events())
    assert index.longest_prefix([key(7)], nodes={"dnode"}) == 1
    gate.set()
    store.snic.close()
