"""TieredStore (DRAM tier + NVMe tier behind a StorageNIC) and the cluster KVIndex.

No Ray: DRAM handles are the tensors themselves. Real files in a temp directory."""

from __future__ import annotations

import pytest
import torch

from kvstore.index import IndexEvent, KVIndex
from kvstore.snic import StorageNIC
from kvstore.store import TieredStore
from kvstore.tiers.dram import DRAMTier
from kvstore.tiers.nvme import NVMeTier
from tests.helpers import wait_until

SHAPE = (4, 2, 16, 2, 8)  # [layers, 2, block_size, kv_heads, head_dim]
NBYTES = 4 * 2 * 16 * 2 * 8 * 4


def key(i: int) -> bytes:
    return i.to_bytes(16, "little")


def block(seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture
def make_store(tmp_path):
    stores = []

    def make(dram_blocks: int = 2, node: str = "n0", root=None) -> TieredStore:
        store = TieredStore(
            node,
            DRAMTier(dram_blocks * NBYTES, NBYTES),
            NVMeTier(root or tmp_path / "nvme", fsync=False),
            StorageNIC(node),
            wrap=lambda t: t.clone(),
            unwrap=lambda t: t,
            block_size=16,
            block_nbytes=NBYTES,
        )
        stores.append(store)
        return store

    yield make
    for s in stores:
        s.snic.close()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_through_both_tiers_is_bit_exact(make_store, dtype):
    store = make_store(dram_blocks=1)
    blocks = [block(i, dtype) for i in range(3)]
    for i, b in enumerate(blocks):
        assert store.persist(key(i), b)
    store.flush()
    # blocks 0 and 1 left DRAM (capacity 1): they come back from NVMe through the SNIC
    loaded = store.load([key(0), key(1), key(2)])
    assert len(loaded) == 3
    for got, want in zip(loaded, blocks, strict=True):
        assert torch.equal(bits(got), bits(want))
    assert store.counters["blocks_from_nvme"] >= 2
    assert store.snic.metrics().bytes_read_total >= 2 * NBYTES


def test_persist_is_idempotent_and_writes_in_the_background(make_store):
    store = make_store()
    assert store.persist(key(1), block(1))
    assert not store.persist(key(1), block(1))
    store.flush()
    assert store.nvme.contains(key(1))
    assert store.snic.metrics().bytes_written_total == NBYTES


def test_a_corrupt_block_ends_the_prefix_and_is_removed(make_store, tmp_path):
    store = make_store(dram_blocks=0)
    for i in range(4):
        store.persist(key(i), block(i))
    store.flush()
    path = store.nvme.path_of(key(2))
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip a payload byte
    path.write_bytes(bytes(data))
    loaded = store.load([key(i) for i in range(4)])
    assert len(loaded) == 2  # blocks 0, 1; the corrupt block 2 is a miss, never wrong KV
    assert not path.exists()
    events = store.drain_events()
    assert IndexEvent(key(2), "nvme", False) in events


def test_truncated_and_missing_blocks_are_misses(make_store):
    store = make_store(dram_blocks=0)
    for i in range(3):
        store.persist(key(i), block(i))
    store.flush()
    path = store.nvme.path_of(key(1))
    path.write_bytes(path.read_bytes()[:100])
    assert len(store.load([key(0), key(1), key(2)])) == 1
    store.nvme.path_of(key(0)).unlink()
    assert store.load([key(0), key(2)]) == []


def test_dram_eviction_is_lru_and_spills_to_nvme(make_store):
    store = make_store(dram_blocks=2)
    store.nvme.persistence_enabled = True
    for i in range(2):
        store.persist(key(i), block(i))
    store.flush()
    store.load([key(0)])  # touch 0: block 1 is now least recently used
    store.persist(key(2), block(2))
    assert store.dram.keys() == [key(0), key(2)]
    events = store.drain_events()
    assert IndexEvent(key(1), "dram", False, "n0") in events
    assert store.nvme.contains(key(1))  # it had been persisted: still loadable
    assert torch.equal(store.load([key(1)])[0], block(1))


def test_another_nodes_blocks_on_the_shared_directory_are_readable(make_store, tmp_path):
    writer = make_store(dram_blocks=0, node="a", root=tmp_path / "shared")
    reader = make_store(dram_blocks=0, node="b", root=tmp_path / "shared")
    writer.persist(key(7), block(7))
    writer.flush()
    (got,) = reader.load([key(7)])
    assert torch.equal(got, block(7))


def test_restart_rebuilds_from_the_directory_and_resyncs_the_index(make_store, tmp_path):
    store = make_store(dram_blocks=0)
    for i in range(3):
        store.persist(key(i), block(i))
    store.flush()
    restarted = make_store(dram_blocks=0)
    index = KVIndex()
    index.apply(restarted.snapshot_events())
    assert index.longest_prefix([key(0), key(1), key(2), key(3)]) == 3


def test_disk_full_stops_persistence_not_serving(make_store, monkeypatch):
    store = make_store(dram_blocks=4)
    import errno

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store.nvme, "_write_file", full)
    assert store.persist(key(1), block(1))
    store.flush()
    assert not store.nvme.contains(key(1))
    assert not store.nvme.persistence_enabled
    (got,) = store.load([key(1)])  # still served from DRAM
    assert torch.equal(got, block(1))


def test_index_longest_prefix_tiers_and_node_drop():
    index = KVIndex()
    index.apply(
        [
            IndexEvent(key(0), "nvme", True, nbytes=10),
            IndexEvent(key(1), "dram", True, "n1", 10),
            IndexEvent(key(2), "nvme", True, nbytes=10),
        ]
    )
    assert index.longest_prefix([key(0), key(1), key(2), key(3)]) == 3
    assert index.longest_prefix([key(1), key(0)]) == 2
    assert index.longest_prefix([key(9), key(0)]) == 0
    index.drop_node("n1")  # its DRAM is gone and block 1 lived nowhere else
    assert index.longest_prefix([key(0), key(1), key(2)]) == 1
    index.apply([IndexEvent(key(0), "nvme", False)])
    assert len(index) == 1 and index.stats()["nvme_blocks"] == 1


def test_each_block_is_written_once_even_without_a_dram_tier(make_store, tmp_path):
    store = make_store(dram_blocks=0)
    for i in range(3):
        store.persist(key(i), block(i))
    store.flush()
    assert store.snic.metrics().bytes_written_total == 3 * NBYTES
    # a block another node already wrote to the shared directory is not written again
    other = make_store(dram_blocks=0, node="n1")
    assert not other.persist(key(1), block(1))
    other.flush()
    assert other.snic.metrics().bytes_written_total == 0


def test_a_block_not_written_yet_is_not_dropped_from_the_index(make_store, tmp_path):
    """Another node announced the block; a read here before its write lands is a miss, but
    must not tell the cluster index the block is gone."""
    reader = make_store(dram_blocks=0, node="b")
    assert reader.load([key(5)]) == []
    assert IndexEvent(key(5), "nvme", False) not in reader.drain_events()


def test_pending_writes_are_bounded(make_store):
    store = make_store(dram_blocks=0)
    store.max_pending_writes = 0
    assert not store.persist(key(1), block(1))
    assert store.counters["persist_dropped"] == 1


def test_index_hits_in_dram_count_only_on_the_reading_nodes():
    index = KVIndex()
    index.apply([IndexEvent(key(0), "nvme", True), IndexEvent(key(1), "dram", True, "a")])
    keys = [key(0), key(1)]
    assert index.longest_prefix(keys, nodes={"a", "b"}) == 2
    assert index.longest_prefix(keys, nodes={"b", "c"}) == 1


CORRUPTIONS = ("payload_bit", "header_bit", "truncate", "empty", "other_key", "garbage")


def corrupt(path, how: str, rng, donor: bytes) -> None:
    data = bytearray(path.read_bytes())
    if how == "payload_bit":
        data[rng.randrange(len(data) - NBYTES, len(data))] ^= 1 << rng.randrange(8)
    elif how == "header_bit":
        data[rng.randrange(0, len(data) - NBYTES)] ^= 1 << rng.randrange(8)
    elif how == "truncate":
        del data[rng.randrange(1, len(data)) :]
    elif how == "empty":
        data = bytearray()
    elif how == "other_key":  # a whole, valid block of another key under this key's name
        data = bytearray(donor)
    else:
        data = bytearray(rng.randbytes(len(data)))
    path.write_bytes(bytes(data))


def test_a_thousand_corrupt_or_truncated_blocks_are_never_served(make_store, tmp_path):
    """Issue 8: 1,000 stored blocks, each damaged one of six ways on disk, read through the
    store (the request path: SNIC → NVMe tier) and again after a restart: 0 served, every
    one counted corrupt and removed, and the intact control blocks still served."""
    import random

    rng = random.Random(8)
    store = make_store(dram_blocks=0)
    n, controls = 1000, 20
    for i in range(n + controls):
        assert store.persist(key(i), block(i))
    store.flush()
    donor = store.nvme.path_of(key(n)).read_bytes()  # control block n, valid, other key
    for i in range(n):
        corrupt(store.nvme.path_of(key(i)), CORRUPTIONS[i % len(CORRUPTIONS)], rng, donor)
    served = sum(len(store.load([key(i)])) for i in range(n))
    assert served == 0
    assert store.nvme.stats()["corrupt"] == n
    assert not any(store.nvme.path_of(key(i)).exists() for i in range(n))
    for i in range(n, n + controls):  # intact blocks are untouched by the scan
        (got,) = store.load([key(i)])
        assert torch.equal(got, block(i))
    # a prefix read stops at the first bad block: [good, bad, good] serves one block
    for i, k in enumerate(key(n + controls + j) for j in range(3)):
        assert store.persist(k, block(i))
    store.flush()
    corrupt(store.nvme.path_of(key(n + controls + 1)), "payload_bit", rng, donor)
    assert len(store.load([key(n + controls + j) for j in range(3)])) == 1
    # and after a restart, a fresh tier lists only whole blocks
    fresh = NVMeTier(tmp_path / "nvme", fsync=False)
    assert sorted(fresh.keys()) == sorted(
        key(i) for i in range(n, n + controls + 3) if i != n + controls + 1
    )


def test_a_cancelled_load_stops_and_drops_its_queued_snic_reads(tmp_path):
    """The request left (the TrafficManager's handler was cancelled): the load returns at
    once, and the SNIC never runs the reads still queued for it."""
    import threading
    import time

    n = 40
    rate = 20 * NBYTES  # 20 blocks/s: 40 blocks would take 2 s
    writer = TieredStore(
        "n0",
        DRAMTier(0, NBYTES),
        NVMeTier(tmp_path / "nvme", fsync=False),
        StorageNIC("n0"),
        wrap=lambda t: t.clone(),
        unwrap=lambda t: t,
        block_size=16,
        block_nbytes=NBYTES,
    )
    for i in range(n):
        writer.persist(key(i), block(i))
    writer.snic.close()  # waits for the writes
    reader = TieredStore(
        "n0",
        DRAMTier(0, NBYTES),
        NVMeTier(tmp_path / "nvme", fsync=False),
        StorageNIC("n0", bandwidth_bytes_per_s=rate),
        wrap=lambda t: t.clone(),
        unwrap=lambda t: t,
        block_size=16,
        block_nbytes=NBYTES,
    )
    try:
        cancel = threading.Event()
        threading.Timer(0.3, cancel.set).start()
        start = time.monotonic()
        got = reader.load([key(i) for i in range(n)], cancel)
        assert time.monotonic() - start < 1.0  # not the 2 s of the whole prefix
        assert 0 < len(got) < n and reader.counters["loads_cancelled"] == 1
        assert all(torch.equal(g, block(i)) for i, g in enumerate(got))  # what came is right
        wait_until(  # (queued figures count the reads in flight too)
            lambda: reader.snic.metrics().read_ops_queued == 0, "the rest leave the SNIC, unread"
        )
        metrics = reader.snic.metrics()
        assert metrics.bytes_read_total <= (len(got) + 3) * NBYTES  # + those in flight
    finally:
        reader.snic.close(wait=False)


def test_a_stalled_disk_read_ends_the_prefix_at_the_deadline(make_store, monkeypatch):
    """A read that hangs (a slow or stalled disk) costs at most `read_timeout_s`: the load
    returns the blocks before it and the rest is recomputed; serving never hangs on it."""
    import threading
    import time

    store = make_store(dram_blocks=0)
    for i in range(6):
        store.persist(key(i), block(i))
    store.flush()
    stuck = threading.Event()
    read = store.nvme.get

    def slow_read(k):
        if k == key(3):
            stuck.wait(5)  # stalled until the test ends
        return read(k)

    monkeypatch.setattr(store.nvme, "get", slow_read)
    store.read_timeout_s = 0.4
    start = time.monotonic()
    got = store.load([key(i) for i in range(6)])
    took = time.monotonic() - start
    stuck.set()
    assert 0.4 <= took < 2.0
    assert [torch.equal(g, block(i)) for i, g in enumerate(got)] == [True] * 3
    assert store.counters["read_timeouts"] == 1


def test_a_dram_only_load_serves_a_pull_without_touching_the_snic(make_store):
    """Another node pulls what this node's DRAM holds (issue 24): the DRAM run is served,
    the first block only on NVMe ends it, and no byte crosses this node's SNIC."""
    store = make_store(dram_blocks=2)
    blocks = [block(i) for i in range(4)]
    for i, b in enumerate(blocks):
        assert store.persist(key(i), b)
    store.flush()  # DRAM keeps the last two; all four are on NVMe
    read_before = store.snic.metrics().bytes_read_total
    assert store.load([key(0), key(1)], dram_only=True) == []  # NVMe only: not a pull
    got = store.load([key(2), key(3), key(0)], dram_only=True)
    assert [torch.equal(g, w) for g, w in zip(got, blocks[2:], strict=True)] == [True, True]
    assert store.snic.metrics().bytes_read_total == read_before
    assert store.counters["blocks_pulled"] == 2
