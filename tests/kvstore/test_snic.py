"""StorageNIC: futures, READ-over-WRITE priority with a write floor, the shared-link cap,
metrics and shutdown. Pure threads, no Ray; the whole file runs in a few seconds."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from kvstore.snic import IOClass, SNICMetrics, StorageNIC

MB = 1_000_000
TIMEOUT_S = 5.0


def _gate_op(snic: StorageNIC, io_class: IOClass, nbytes: int = 1, num_tokens: int = 0):
    """Submit an op that blocks its worker until `gate` is set; returns once it is running."""
    started, gate = threading.Event(), threading.Event()

    def fn() -> str:
        started.set()
        assert gate.wait(TIMEOUT_S), "test never released the gate"
        return "gate"

    fut = snic.submit(io_class, nbytes, fn, num_tokens=num_tokens)
    assert started.wait(TIMEOUT_S)
    return fut, gate


def _recorder(order: list[str], name: str) -> Callable[[], str]:
    def fn() -> str:
        order.append(name)
        return name

    return fn


class FakeTime:
    """Clock whose sleep advances it; valid with one worker only."""

    def __init__(self) -> None:
        self.now = 0.0
        self._lock = threading.Lock()

    def clock(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


def test_results_and_exceptions_propagate_and_worker_survives() -> None:
    with StorageNIC("n0", num_workers=1) as snic:
        assert snic.submit(IOClass.READ, 10, lambda: 42).result(TIMEOUT_S) == 42

        def boom() -> None:
            raise ValueError("boom")

        failed = snic.submit(IOClass.WRITE, 5, boom)
        with pytest.raises(ValueError, match="boom"):
            failed.result(TIMEOUT_S)
        assert snic.submit(IOClass.READ, 7, lambda: "still alive").result(TIMEOUT_S) == (
            "still alive"
        )
        m = snic.metrics()
    # A failed op moved no bytes; its queue entry is released all the same.
    assert (m.bytes_read_total, m.bytes_written_total) == (17, 0)
    assert (m.write_queue_bytes, m.write_ops_queued) == (0, 0)


def test_workers_are_named_daemon_threads() -> None:
    with StorageNIC("nodeX", num_workers=3) as snic:
        names = {t.name: t for t in threading.enumerate() if t.name.startswith("snic-nodeX-")}
        assert sorted(names) == ["snic-nodeX-0", "snic-nodeX-1", "snic-nodeX-2"]
        assert all(t.daemon for t in names.values())
        snic.close()
        assert not any(t.is_alive() for t in names.values())


def test_reads_overtake_queued_writes_fifo_within_class() -> None:
    order: list[str] = []
    with StorageNIC("n0", num_workers=1) as snic:
        gate_fut, gate = _gate_op(snic, IOClass.WRITE)
        futs = [snic.submit(IOClass.WRITE, MB, _recorder(order, n)) for n in ("w1", "w2")]
        futs += [snic.submit(IOClass.READ, MB, _recorder(order, n)) for n in ("r1", "r2")]
        gate.set()
        for f in [gate_fut, *futs]:
            f.result(TIMEOUT_S)
    assert order == ["r1", "r2", "w1", "w2"]


def _read_stream_with_writes(min_write_share: float, num_writes: int = 3) -> list[str]:
    """200 x 1 MB reads and a few writes, all queued behind a gate; completion order."""
    order: list[str] = []
    with StorageNIC("n0", num_workers=1, min_write_share=min_write_share) as snic:
        gate_fut, gate = _gate_op(snic, IOClass.READ)
        futs = [
            snic.submit(IOClass.WRITE, MB, _recorder(order, f"w{i}")) for i in range(num_writes)
        ]
        futs += [snic.submit(IOClass.READ, MB, _recorder(order, f"r{i}")) for i in range(200)]
        gate.set()
        for f in [gate_fut, *futs]:
            f.result(TIMEOUT_S)
    return order


def test_writes_do_not_starve_under_continuous_reads() -> None:
    order = _read_stream_with_writes(min_write_share=0.05)
    last_write = max(order.index(f"w{i}") for i in range(3))
    assert last_write < order.index("r199")
    # 5% of the bytes: about one 1 MB write per 19 reads.
    assert sum(1 for name in order[: order.index("w0")] if name.startswith("r")) >= 10


def test_min_write_share_sets_the_write_floor() -> None:
    order = _read_stream_with_writes(min_write_share=0.2, num_writes=20)
    reads_before_first_write = order.index("w0")
    assert 3 <= reads_before_first_write < 20  # reads still go first, writes soon follow
    # 20% of the bytes: ~10 writes among the first 50 completions.
    assert 8 <= sum(1 for name in order[:50] if name.startswith("w")) <= 12


def test_zero_write_share_is_strict_priority() -> None:
    order = _read_stream_with_writes(min_write_share=0.0)
    assert order[-3:] == ["w0", "w1", "w2"]


def test_cap_is_shared_by_all_workers() -> None:
    cap = 50 * MB
    with StorageNIC("n0", bandwidth_bytes_per_s=cap, num_workers=2) as snic:
        t0 = time.monotonic()
        futs = [snic.submit(IOClass.READ, 2_500_000, lambda: None) for _ in range(10)]
        for f in futs:
            f.result(TIMEOUT_S)
        elapsed = time.monotonic() - t0
        m = snic.metrics()
    # 25 MB at 50 MB/s on one link: 0.5 s (0.25 s if each worker had its own cap).
    assert 0.45 <= elapsed <= 0.9
    assert 0.7 * cap <= m.read_throughput_bytes_per_s <= 1.3 * cap
    assert m.bytes_read_total == 25 * MB
    assert m.read_queue_bytes == 0


def test_uncapped_runs_at_fn_speed() -> None:
    with StorageNIC("n0", num_workers=2) as snic:
        t0 = time.monotonic()
        futs = [snic.submit(IOClass.READ, 100 * MB, lambda: None) for _ in range(20)]
        for f in futs:
            f.result(TIMEOUT_S)
        assert time.monotonic() - t0 < 0.3


def test_reservation_and_busy_time_with_fake_clock() -> None:
    ft = FakeTime()
    snic = StorageNIC(
        "n0", bandwidth_bytes_per_s=100 * MB, num_workers=1, clock=ft.clock, sleep=ft.sleep
    )
    with snic:
        futs = [snic.submit(IOClass.READ, 10 * MB, lambda: None) for _ in range(4)]
        futs.append(snic.submit(IOClass.WRITE, 10 * MB, lambda: None))
        for f in futs:
            f.result(TIMEOUT_S)
        assert ft.now == pytest.approx(0.5)
        assert snic.metrics().busy_s == pytest.approx(0.5)
        # An idle gap is neither busy time nor link debt: the next op starts now.
        ft.now = 3.0
        snic.submit(IOClass.READ, 10 * MB, lambda: None).result(TIMEOUT_S)
        m = snic.metrics()
    assert ft.now == pytest.approx(3.1)
    assert m.busy_s == pytest.approx(0.6)
    # Only the last read (10 MB over 0.1 s) is inside the 2 s window.
    assert m.read_throughput_bytes_per_s == pytest.approx(100 * MB)
    assert m.write_throughput_bytes_per_s == 0.0
    assert (m.bytes_read_total, m.bytes_written_total) == (50 * MB, 10 * MB)


def test_metrics_track_queued_and_in_flight_ops() -> None:
    cap = 1e9
    with StorageNIC("n7", bandwidth_bytes_per_s=cap, num_workers=1) as snic:
        gate_fut, gate = _gate_op(snic, IOClass.READ, nbytes=1 * MB, num_tokens=10)
        futs = [
            snic.submit(IOClass.READ, 2 * MB, lambda: None, num_tokens=20),
            snic.submit(IOClass.READ, 3 * MB, lambda: None, num_tokens=30),
            snic.submit(IOClass.WRITE, 4 * MB, lambda: None, num_tokens=40),
        ]
        held = snic.metrics()
        gate.set()
        for f in [gate_fut, *futs]:
            f.result(TIMEOUT_S)
        after = snic.metrics()
    assert (held.node_id, held.bandwidth_bytes_per_s) == ("n7", cap)
    assert (held.read_queue_bytes, held.read_queue_tokens, held.read_ops_queued) == (
        6 * MB,
        60,
        3,
    )
    assert (held.write_queue_bytes, held.write_queue_tokens, held.write_ops_queued) == (
        4 * MB,
        40,
        1,
    )
    assert held.read_queue_s() == pytest.approx(6 * MB / cap)
    assert (held.bytes_read_total, held.bytes_written_total) == (0, 0)
    assert held.busy_s > 0
    assert (after.read_queue_bytes, after.read_queue_tokens, after.read_ops_queued) == (0, 0, 0)
    assert (after.write_queue_bytes, after.write_queue_tokens, after.write_ops_queued) == (0, 0, 0)
    assert (after.bytes_read_total, after.bytes_written_total) == (6 * MB, 4 * MB)
    assert after.read_queue_s() == 0.0
    assert after.timestamp_s >= held.timestamp_s


def _metrics(bandwidth: float | None, queued: int, throughput: float) -> SNICMetrics:
    return SNICMetrics("n", bandwidth, queued, 0, 0, 0, 1, 0, 0, 0, throughput, 0.0, 0.0, 0.0)


def test_read_queue_s_uses_cap_else_measured_throughput() -> None:
    assert _metrics(10 * MB, 5 * MB, 1.0).read_queue_s() == pytest.approx(0.5)
    assert _metrics(None, 5 * MB, 20 * MB).read_queue_s() == pytest.approx(0.25)
    assert _metrics(None, 5 * MB, 0.0).read_queue_s() == 0.0


def test_submit_after_close_raises() -> None:
    snic = StorageNIC("n0")
    snic.close()
    with pytest.raises(RuntimeError, match="closed"):
        snic.submit(IOClass.READ, 1, lambda: None)


def test_close_waits_for_queued_ops() -> None:
    snic = StorageNIC("n0", num_workers=1)
    futs = [snic.submit(IOClass.WRITE, 1, lambda i=i: time.sleep(0.01) or i) for i in range(5)]
    snic.close()
    assert [f.result(0) for f in futs] == [0, 1, 2, 3, 4]


def test_close_without_wait_cancels_queued_ops() -> None:
    snic = StorageNIC("n0", num_workers=1)
    gate_fut, gate = _gate_op(snic, IOClass.READ)
    queued = [snic.submit(IOClass.WRITE, 100, lambda: "ran") for _ in range(3)]
    closer = threading.Thread(target=snic.close, kwargs={"wait": False})
    closer.start()
    deadline = time.monotonic() + TIMEOUT_S
    while not all(f.cancelled() for f in queued) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert all(f.cancelled() for f in queued)
    assert closer.is_alive()  # joining the worker, whose in-flight op still runs
    gate.set()
    closer.join(TIMEOUT_S)
    assert not closer.is_alive()
    assert gate_fut.result(0) == "gate"
    m = snic.metrics()
    assert (m.write_queue_bytes, m.write_ops_queued, m.bytes_written_total) == (0, 0, 0)
