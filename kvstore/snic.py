"""StorageNIC: one node's storage NIC, emulated as a prioritised I/O queue over one link.

Every NVMe read or write of a (logical) node goes through its node's `StorageNIC`: worker
threads run the real file I/O, an optional cap makes them share one link's bandwidth (so
one machine can emulate a cluster whose storage NICs are the bottleneck), and `metrics()`
publishes the read queue that the Scheduler balances across nodes.

Dispatch rule, applied when a worker is free (so a later op of higher priority overtakes
queued ops, never running ones). Each class is FIFO. If only one class has queued ops, its
head goes. If both do (contention), the head WRITE of `w` bytes goes iff
`written + w <= min_write_share * (read + written + w)`, where `read` / `written` are the
bytes dispatched per class in the current contention period; else the head READ goes. The
period's counters reset whenever a dispatch finds either queue empty. So READs (a request
waits for them) go first, yet under a continuous read load WRITEs (persistence) still get
`min_write_share` of the bytes and cannot starve; `min_write_share=0` is strict priority.

Bandwidth cap, by reservation of the one link: at dispatch `start = max(now, link_free_at)`,
`finish = start + nbytes / cap`, `link_free_at = finish`; the worker runs `fn()`, then
sleeps until `finish` if `fn()` was faster. Ops dispatched while the link is busy wait
behind it, and all workers together move about `cap` bytes/s. Uncapped, ops run as fast as
`fn()` goes (`num_workers` bounds concurrency).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class IOClass(enum.IntEnum):
    """Priority class of an I/O op; a lower value is served first."""

    READ = 0  # on-path KV loading: a request waits for it
    WRITE = 1  # background persistence


@dataclass(frozen=True, slots=True)
class SNICMetrics:
    """Snapshot of one StorageNIC. Queue figures count queued plus in-flight ops."""

    node_id: str
    bandwidth_bytes_per_s: float | None
    read_queue_bytes: int
    read_queue_tokens: int
    write_queue_bytes: int
    write_queue_tokens: int
    read_ops_queued: int
    write_ops_queued: int
    bytes_read_total: int
    bytes_written_total: int
    read_throughput_bytes_per_s: float
    write_throughput_bytes_per_s: float
    busy_s: float
    timestamp_s: float

    def read_queue_s(self) -> float:
        """Seconds to drain the read queue: at the cap, else at the measured read
        throughput; 0 when uncapped and nothing has been measured."""
        rate = self.bandwidth_bytes_per_s or self.read_throughput_bytes_per_s
        return self.read_queue_bytes / rate if rate > 0 else 0.0


@dataclass(slots=True)
class _Op:
    io_class: IOClass
    nbytes: int
    num_tokens: int
    fn: Callable[[], Any]
    future: Future[Any]


class _ClassState:
    """Queue and counters of one IOClass (guarded by the NIC's lock)."""

    def __init__(self) -> None:
        self.queue: deque[_Op] = deque()
        self.pending_bytes = 0  # queued + in flight
        self.pending_tokens = 0
        self.pending_ops = 0
        self.total_bytes = 0  # completed successfully
        self.samples: deque[tuple[float, float, int]] = deque()  # (start, end, nbytes)
        self.window_bytes = 0  # sum of nbytes over `samples`

    def account(self, op: _Op, sign: int) -> None:
        self.pending_bytes += sign * op.nbytes
        self.pending_tokens += sign * op.num_tokens
        self.pending_ops += sign

    def record(self, start: float, end: float, nbytes: int, window_s: float) -> None:
        self.total_bytes += nbytes
        self.samples.append((start, end, nbytes))
        self.window_bytes += nbytes
        self.prune(end, window_s)

    def prune(self, now: float, window_s: float) -> None:
        while self.samples and self.samples[0][1] < now - window_s:
            self.window_bytes -= self.samples.popleft()[2]

    def throughput(self, now: float, window_s: float) -> float:
        """Bytes completed in the window over the time since the earliest of them started
        (at most window_s), so a burst right after idling reads at its true rate."""
        self.prune(now, window_s)
        if not self.samples:
            return 0.0
        span = min(window_s, now - min(s[0] for s in self.samples))
        return self.window_bytes / span if span > 0 else 0.0


class StorageNIC:
    """One node's storage NIC: prioritised READ/WRITE queues over one (optionally capped) link.

    Usage:
        with StorageNIC("node0", bandwidth_bytes_per_s=2e9) as snic:
            fut = snic.submit(IOClass.READ, nbytes, path.read_bytes, num_tokens=64)
            data = fut.result()
            snic.metrics().read_queue_s()  # what the Scheduler compares across nodes
    """

    def __init__(
        self,
        node_id: str,
        bandwidth_bytes_per_s: float | None = None,
        num_workers: int = 2,
        min_write_share: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        window_s: float = 2.0,
    ) -> None:
        """Start the worker threads.

        Args:
            node_id: the (logical) node this NIC belongs to; names the worker threads.
            bandwidth_bytes_per_s: the link's cap shared by all workers; None = uncapped.
            num_workers: threads running ops concurrently (the link is still one).
            min_write_share: share of the bytes WRITEs get while READs are also queued.
            clock: monotonic time source in seconds (injectable for tests).
            sleep: sleeps for a number of seconds (injectable for tests).
            window_s: sliding window of the throughput metrics.
        """
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not 0.0 <= min_write_share <= 1.0:
            raise ValueError(f"min_write_share must be in [0, 1], got {min_write_share}")
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        if bandwidth_bytes_per_s is not None and bandwidth_bytes_per_s <= 0:
            raise ValueError(f"bandwidth must be > 0 or None, got {bandwidth_bytes_per_s}")
        self.node_id = node_id
        self.bandwidth_bytes_per_s = bandwidth_bytes_per_s
        self._min_write_share = min_write_share
        self._clock = clock
        self._sleep = sleep
        self._window_s = window_s
        # NOTE: one lock guards all state below; fn() and future completion run outside it.
        self._cond = threading.Condition()
        self._classes = (_ClassState(), _ClassState())  # indexed by IOClass
        self._contended = [0, 0]  # bytes dispatched per class in this contention period
        self._link_free_at = clock()
        self._active = 0  # ops dispatched and not yet complete
        self._busy_since = 0.0
        self._busy_s = 0.0
        self._closed = False
        self._workers = [
            threading.Thread(target=self._run, name=f"snic-{node_id}-{i}", daemon=True)
            for i in range(num_workers)
        ]
        for worker in self._workers:
            worker.start()

    def submit(
        self, io_class: IOClass, nbytes: int, fn: Callable[[], T], num_tokens: int = 0
    ) -> Future[T]:
        """Queue an I/O op; a worker runs `fn()` and completes the future with its outcome.

        Args:
            io_class: READ (on the request path) or WRITE (background persistence).
            nbytes: bytes the op moves over the link (drives the cap and the metrics).
            fn: the real I/O; its result or exception completes the returned future.
            num_tokens: tokens of KV the op carries (reported in the queue metrics).
        """
        if nbytes < 0 or num_tokens < 0:
            raise ValueError(f"nbytes and num_tokens must be >= 0, got {nbytes}, {num_tokens}")
        op = _Op(IOClass(io_class), nbytes, num_tokens, fn, Future())
        with self._cond:
            if self._closed:
                raise RuntimeError(f"StorageNIC {self.node_id!r} is closed")
            self._classes[op.io_class].queue.append(op)
            self._classes[op.io_class].account(op, +1)
            self._cond.notify()
        return op.future

    def metrics(self) -> SNICMetrics:
        """A consistent snapshot of the queues, totals and windowed throughput."""
        with self._cond:
            now = self._clock()
            reads, writes = self._classes
            busy = self._busy_s + (now - self._busy_since if self._active else 0.0)
            return SNICMetrics(
                node_id=self.node_id,
                bandwidth_bytes_per_s=self.bandwidth_bytes_per_s,
                read_queue_bytes=reads.pending_bytes,
                read_queue_tokens=reads.pending_tokens,
                write_queue_bytes=writes.pending_bytes,
                write_queue_tokens=writes.pending_tokens,
                read_ops_queued=reads.pending_ops,
                write_ops_queued=writes.pending_ops,
                bytes_read_total=reads.total_bytes,
                bytes_written_total=writes.total_bytes,
                read_throughput_bytes_per_s=reads.throughput(now, self._window_s),
                write_throughput_bytes_per_s=writes.throughput(now, self._window_s),
                busy_s=busy,
                timestamp_s=now,
            )

    def close(self, wait: bool = True) -> None:
        """Stop accepting ops and join the workers (in-flight ops always finish).

        Args:
            wait: True runs the queued ops first; False cancels their futures.
        """
        cancelled: list[_Op] = []
        with self._cond:
            self._closed = True
            if not wait:
                for st in self._classes:
                    while st.queue:
                        cancelled.append(st.queue.popleft())
                        st.account(cancelled[-1], -1)
            self._cond.notify_all()
        for op in cancelled:  # outside the lock: cancel() runs done-callbacks
            op.future.cancel()
        for worker in self._workers:
            if worker is not threading.current_thread():
                worker.join()

    def __enter__(self) -> StorageNIC:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                op = self._next_locked()
                if op is None:
                    return
                # NOTE: the link is reserved at dispatch, so ops queue behind it in order.
                start = self._clock()
                finish = None
                if self.bandwidth_bytes_per_s is not None:
                    start = max(start, self._link_free_at)
                    finish = start + op.nbytes / self.bandwidth_bytes_per_s
                    self._link_free_at = finish
            result: Any = None
            error: BaseException | None = None
            try:
                result = op.fn()
            except BaseException as exc:  # the future carries it; the worker lives on
                logger.debug("snic %s: op failed: %r", self.node_id, exc)
                error = exc
            if finish is not None and error is None:
                delay = finish - self._clock()
                if delay > 0:
                    self._sleep(delay)
            with self._cond:
                self._complete_locked(op, start, ok=error is None)
            if error is None:
                op.future.set_result(result)
            else:
                op.future.set_exception(error)

    def _next_locked(self) -> _Op | None:
        """Wait for the next op by the dispatch rule; None once closed and drained."""
        reads, writes = self._classes[IOClass.READ].queue, self._classes[IOClass.WRITE].queue
        while True:
            while not reads and not writes:
                if self._closed:
                    return None
                self._cond.wait()
            if reads and writes:
                w = writes[0].nbytes
                read_b, write_b = self._contended
                share_ok = write_b + w <= self._min_write_share * (read_b + write_b + w)
                io_class = IOClass.WRITE if share_ok else IOClass.READ
                op = self._classes[io_class].queue.popleft()
                self._contended[io_class] += op.nbytes
            else:
                self._contended = [0, 0]
                op = (reads or writes).popleft()
            if op.future.set_running_or_notify_cancel():
                if self._active == 0:
                    self._busy_since = self._clock()
                self._active += 1
                return op
            self._classes[op.io_class].account(op, -1)  # its owner cancelled it

    def _complete_locked(self, op: _Op, start: float, ok: bool) -> None:
        # NOTE: runs before the future completes, so a caller's result() sees the metrics.
        now = self._clock()
        st = self._classes[op.io_class]
        st.account(op, -1)
        self._active -= 1
        if self._active == 0:
            self._busy_s += now - self._busy_since
        if ok:
            st.record(start, now, op.nbytes, self._window_s)
