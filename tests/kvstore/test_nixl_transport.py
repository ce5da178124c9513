"""NixlTransport over UCX on CPU DRAM: exact round trips, page accounting, two processes."""

from __future__ import annotations

import multiprocessing as mp
import queue
import threading
import time
from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("nixl")

from kvstore.transfer import nixl as nixl_transport  # noqa: E402
from kvstore.transfer.base import KVDescriptor  # noqa: E402
from kvstore.transfer.nixl import NixlTransport, TransferCapacityError, _PagePool  # noqa: E402
from tests.helpers import wait_until  # noqa: E402

LAYER_SHAPE = (3, 2, 64, 3, 64)  # [num_blocks, 2, block_size, kv_heads, head_dim]
POOL_BYTES = 8 * 2**20


def make_layers(seed: int, dtype: torch.dtype, num_layers: int = 4) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(LAYER_SHAPE, generator=gen).to(dtype) for _ in range(num_layers)]


def wait_until_freed(transport: NixlTransport, timeout_s: float = 5.0) -> bool:
    """The release notification is asynchronous: poll until the pool is whole again."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        transport.poll()
        if transport.free_bytes == POOL_BYTES:
            return True
        time.sleep(0.005)
    return False


@pytest.fixture
def pair() -> Iterator[tuple[NixlTransport, NixlTransport]]:
    sender, receiver = NixlTransport(POOL_BYTES), NixlTransport(POOL_BYTES)
    yield sender, receiver
    sender.close()
    receiver.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_exact_and_frees_pages(pair, dtype: torch.dtype) -> None:
    sender, receiver = pair
    layers = make_layers(int(torch.randint(0, 2**31, ())), dtype)

    desc = sender.send("req-1", layers)
    assert desc.transport == "nixl" and desc.num_layers == 4
    assert desc.layer_shape == LAYER_SHAPE and desc.dtype == str(dtype).removeprefix("torch.")
    assert sender.free_bytes < POOL_BYTES
    originals = [t.clone() for t in layers]
    layers[0].zero_()  # `send` copied: the caller may reuse its tensors

    got = [t.clone() for t in receiver.recv(desc)]
    assert len(got) == 4
    assert all(g.dtype == dtype and tuple(g.shape) == LAYER_SHAPE for g in got)
    assert all(torch.equal(g, t) for g, t in zip(got, originals, strict=True))
    assert receiver.free_bytes == POOL_BYTES
    assert wait_until_freed(sender)
    receiver.release(desc)  # idempotent after the generator's own release


def test_loopback_same_transport(pair) -> None:
    sender, _ = pair
    layers = make_layers(int(torch.randint(0, 2**31, ())), torch.float32, num_layers=3)
    desc = sender.send("self", layers)
    got = [t.clone() for t in sender.recv(desc)]
    assert all(torch.equal(g, t) for g, t in zip(got, layers, strict=True))
    assert sender.free_bytes == POOL_BYTES


def test_page_pool_first_fit_and_coalescing() -> None:
    pool = _PagePool(num_bytes=10 * 4096, page_bytes=4096)
    a, b, c = pool.alloc(4096), pool.alloc(2 * 4096), pool.alloc(4097)
    assert (a, b, c) == ((0, 1), (1, 2), (3, 2)) and pool.free_pages == 5
    pool.free(b)
    assert pool.alloc(3 * 4096) == (5, 3)  # the 2-page hole is too small: first fit skips it
    pool.free(a)
    pool.free(c)
    assert pool.alloc(5 * 4096) == (0, 5)  # a, b and c coalesced into one run


def test_pool_too_small_raises_capacity_error() -> None:
    small = NixlTransport(staging_bytes=2**20)
    try:
        before = small.free_bytes
        with pytest.raises(TransferCapacityError, match="cannot hold 4 x"):
            small.send("too-big", make_layers(1, torch.float32))  # 4 x 288 KiB > 1 MiB
        assert small.free_bytes == before  # the partial allocation was rolled back
    finally:
        small.close()


@pytest.fixture
def short_lease(monkeypatch) -> float:
    """Leases on a test's time scale: a 0.1 s READ timeout and 0.05 s clock skew, so a lease
    must exceed 0.3 s; returns a 0.6 s lease."""
    monkeypatch.setattr(nixl_transport, "XFER_TIMEOUT_S", 0.1)
    monkeypatch.setattr(nixl_transport, "_CLOCK_SKEW_S", 0.05)
    return 0.6


def test_unreleased_transfer_expires(short_lease) -> None:
    sender = NixlTransport(POOL_BYTES, lease_s=short_lease)
    try:
        sender.send("orphan", make_layers(2, torch.float32, num_layers=2))
        assert sender.free_bytes < POOL_BYTES
        assert wait_until_freed(sender)  # by its pump thread or `poll()`, no receiver needed
    finally:
        sender.close()


def test_a_waiting_receiver_renews_the_lease_then_reads(short_lease, monkeypatch) -> None:
    """The DE holds the descriptor (KVMover.hold) over 3 renewals before reading: they keep
    the PE's pages; the data arrives intact. Unheld, the same transfer (sent at the same
    moment) expires meanwhile."""
    from deployments.protocol import TransferStats
    from deployments.traffic.mover import KVMover
    from engine.output import SequenceKV
    from kvstore.transfer.nixl import TransferExpiredError

    sender = NixlTransport(POOL_BYTES, lease_s=short_lease)
    receiver = NixlTransport(POOL_BYTES, lease_s=short_lease)
    pe = KVMover(sender, TransferStats("pe", "n0", "prefill"))
    de = KVMover(receiver, TransferStats("de", "n0", "decode"))
    renewals = []
    renew = receiver.renew
    monkeypatch.setattr(receiver, "renew", lambda desc: renewals.append(renew(desc)))
    try:
        data = torch.randn(3, 2, 2, 4, 2, 8, generator=torch.Generator().manual_seed(9))
        kv = SequenceKV(list(range(10)), [], data)
        held, orphan = pe.send("held", kv), pe.send("orphan", kv)
        used = POOL_BYTES - sender.free_bytes  # two transfers of the same size
        de.hold(held)
        wait_until(
            lambda: len(renewals) >= 3 and sender.free_bytes == POOL_BYTES - used // 2,
            "the held transfer is renewed 3 times and the orphan's pages are freed",
        )
        assert torch.equal(de.receive(held), data)  # renewed all along: still there
        with pytest.raises(TransferExpiredError):
            de.receive(orphan)  # nobody renewed it: refused, never read
        assert wait_until_freed(sender)  # the orphan's pages were freed by expiry
    finally:
        sender.close()
        receiver.close()


def test_a_renewal_too_late_is_refused(short_lease) -> None:
    from kvstore.transfer.nixl import TransferExpiredError

    sender = NixlTransport(POOL_BYTES, lease_s=short_lease)
    receiver = NixlTransport(POOL_BYTES, lease_s=short_lease)
    try:
        desc = sender.send("late", make_layers(3, torch.float32, num_layers=2))
        receiver.renew(desc)  # in time: counts
        assert receiver.lease_left_s(desc) > short_lease - 0.05
        wait_until(
            lambda: receiver.lease_left_s(desc) < 0.15, "less than READ timeout + skew is left"
        )
        with pytest.raises(TransferExpiredError):
            receiver.renew(desc)
    finally:
        sender.close()
        receiver.close()


def test_lease_must_outlast_a_read() -> None:
    with pytest.raises(ValueError, match="lease_s"):
        NixlTransport(POOL_BYTES, lease_s=20.0)


def test_early_close_still_releases(pair) -> None:
    sender, receiver = pair
    layers = make_layers(int(torch.randint(0, 2**31, ())), torch.bfloat16)
    desc = sender.send("req-early", layers)
    stream = receiver.recv(desc)
    assert torch.equal(next(stream), layers[0])
    stream.close()  # layer 1 is in flight: it must land before the pages are freed
    assert receiver.free_bytes == POOL_BYTES
    assert wait_until_freed(sender)
    receiver.release(desc)


def test_send_and_recv_from_different_threads(pair) -> None:
    sender, receiver = pair
    handoff: queue.Queue[tuple[KVDescriptor, list[torch.Tensor]]] = queue.Queue()

    def produce() -> None:
        # NOTE: 20 transfers overfill the 8 MiB pool; a send waits for the pages the
        # receiver's releases free (they arrive asynchronously), as a PE would back off.
        for i in range(20):
            layers = make_layers(i, torch.bfloat16, num_layers=3)
            deadline = time.monotonic() + 10
            while True:
                try:
                    handoff.put((sender.send(f"req-{i}", layers), layers))
                    break
                except TransferCapacityError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)

    producer = threading.Thread(target=produce)
    producer.start()
    for _ in range(20):
        desc, layers = handoff.get(timeout=10)
        got = [t.clone() for t in receiver.recv(desc)]
        assert all(torch.equal(g, t) for g, t in zip(got, layers, strict=True))
    producer.join()
    assert wait_until_freed(sender)


def test_release_without_recv(pair) -> None:
    sender, receiver = pair
    desc = sender.send("req-dropped", make_layers(3, torch.float32, num_layers=2))
    receiver.release(desc)
    receiver.release(desc)
    assert wait_until_freed(sender)


def _sender_process(seed: int, dtype_name: str, out: mp.Queue) -> None:
    sender = NixlTransport(POOL_BYTES)
    try:
        out.put(sender.send("req-xproc", make_layers(seed, getattr(torch, dtype_name))))
        out.put(wait_until_freed(sender, timeout_s=8.0))
    finally:
        sender.close()


@pytest.mark.integration
def test_two_processes() -> None:
    ctx = mp.get_context("spawn")
    seed = int(torch.randint(0, 2**31, ()))
    results = ctx.Queue()
    child = ctx.Process(target=_sender_process, args=(seed, "bfloat16", results), daemon=True)
    child.start()
    receiver = NixlTransport(POOL_BYTES)
    try:
        desc: KVDescriptor = results.get(timeout=30)
        got = [t.clone() for t in receiver.recv(desc)]
        expected = make_layers(seed, torch.bfloat16)
        assert all(torch.equal(g, t) for g, t in zip(got, expected, strict=True))
        assert receiver.free_bytes == POOL_BYTES
        assert results.get(timeout=10) is True, "the sender did not free its pages"
        child.join(timeout=10)
        assert child.exitcode == 0
    finally:
        receiver.close()
        if child.is_alive():
            child.kill()


def test_stuck_read_times_out(pair, monkeypatch) -> None:
    monkeypatch.setattr(nixl_transport, "XFER_TIMEOUT_S", 0.3)
    sender, receiver = pair
    desc = sender.send("req-stuck", make_layers(4, torch.float32, num_layers=2))
    # Holding the sender's lock stops its pump, so its worker never serves the READ.
    with sender._lock, pytest.raises(TimeoutError):
        next(receiver.recv(desc))
    assert receiver.free_bytes == POOL_BYTES
    assert wait_until_freed(sender)


def test_expired_descriptor_is_refused_not_read():
    """Pages past the sender's release timeout may hold another transfer: never read them."""
    import dataclasses

    from kvstore.transfer.nixl import NixlTransport, TransferExpiredError

    sender, receiver = NixlTransport(staging_bytes=4 << 20), NixlTransport(staging_bytes=4 << 20)
    try:
        layers = [torch.randn(2, 2, 64, 3, 64) for _ in range(2)]
        descriptor = sender.send("old", layers)
        stale = dataclasses.replace(
            descriptor, payload=dataclasses.replace(descriptor.payload, expires_at_unix=0.0)
        )
        with pytest.raises(TransferExpiredError):
            next(iter(receiver.recv(stale)))
        received = [t.clone() for t in receiver.recv(descriptor)]  # the fresh one still works
        assert all(torch.equal(a, b) for a, b in zip(received, layers, strict=True))
    finally:
        sender.close()
        receiver.close()
