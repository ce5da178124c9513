"""KV transfer over NIXL (UCX, CPU DRAM): the receiver READs the sender's staging pages.

- Each endpoint owns one NIXL agent and ONE staging pool (a uint8 CPU tensor registered once)
  cut into pages; a layer takes one contiguous run of pages (first-fit free list).
- `send` copies the layers into the pool (dtype views: bfloat16 is fine) and returns a
  descriptor whose `NixlPayload` holds the sender's agent name and metadata (loaded by the
  receiver on first contact, peers cached by name) and each layer's (address, length). Pages
  stay put until the receiver's `release:<transfer_id>` notification, or until their lease
  (`lease_s`) runs out. The receiver renews the lease (`renew:<transfer_id>`) while it waits
  to read and between layers; an orphaned transfer (its DE or ingress gone) is freed one lease
  after its last renewal, and a receiver never reads pages whose lease may have run out.
- `recv` issues one READ per layer, double-buffered: layer i+1 is in flight while the caller
  holds layer i. After the last layer, or on an early close, it frees its pages and notifies
  the sender. A generator never started does nothing: call `release` (idempotent).
- NIXL's progress thread busy-spins a core per agent (the Python API fixes its delay at 0), so
  it is off. A pump thread calls `get_new_notifs()` every `_PUMP_INTERVAL_S` while transfers
  are staged (a READ needs the sender's worker to progress over UCX/TCP) or just after a
  notification went out, freeing released pages; otherwise it sleeps.
- One lock guards the allocator and every agent call (NIXL runs thread-unsafe); polls drop it
  between checks. A READ not DONE in `XFER_TIMEOUT_S` raises TimeoutError.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

# NOTE: nixl logs INFO lines to stdout for every agent; keep them out of serving logs.
os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
from nixl._api import nixl_agent, nixl_agent_config, nixl_xfer_handle

from kvstore.transfer.base import KVDescriptor

logger = logging.getLogger(__name__)

XFER_TIMEOUT_S = 10.0  # one layer's READ; a lease must outlast it with room to spare
_SPIN_S = 2e-3  # busy-poll a READ this long before sleeping between checks
_PUMP_INTERVAL_S = 5e-4  # ~8% of a core while pumping; 1e-4 costs ~20%
_NOTIF_LINGER_S = 1.0  # keep progressing this long after sending a notification
DEFAULT_PAGE_BYTES = 16 * 2**10
_RELEASE = b"release:"
_RENEW = b"renew:"
_CLOCK_SKEW_S = 5.0

Run = tuple[int, int]  # (first page, number of pages)
Segment = tuple[int, int]  # (address, number of bytes)


class TransferCapacityError(RuntimeError):
    """The staging pool has no room for this transfer; fall back to another transport."""


class TransferExpiredError(RuntimeError):
    """The sender may already have reused this transfer's pages: reading them could return
    another request's KV, so the receiver refuses (the request fails; never wrong KV)."""


@dataclass(frozen=True, slots=True)
class NixlPayload:
    """`KVDescriptor.payload` for NIXL: who holds the layers and where."""

    agent: str
    metadata: bytes
    layers: tuple[Segment, ...]
    expires_at_unix: float = float("inf")  # the sender frees the pages after this
    lease_s: float = float("inf")  # unless a renewal reaches it first: then this long again


class _PagePool:
    """First-fit allocator of contiguous page runs over one byte tensor. Not thread safe."""

    def __init__(self, num_bytes: int, page_bytes: int) -> None:
        self.page_bytes = page_bytes
        self.num_pages = num_bytes // page_bytes
        self.tensor = torch.zeros(self.num_pages * page_bytes, dtype=torch.uint8)
        self._free: list[Run] = [(0, self.num_pages)] if self.num_pages else []

    @property
    def free_pages(self) -> int:
        return sum(count for _, count in self._free)

    def alloc(self, num_bytes: int) -> Run | None:
        need = max(1, -(-num_bytes // self.page_bytes))
        for i, (start, count) in enumerate(self._free):
            if count >= need:
                self._free[i : i + 1] = [(start + need, count - need)] if count > need else []
                return start, need
        return None

    def alloc_runs(self, num_bytes: int, count: int) -> list[Run]:
        """`count` runs of `num_bytes` each: all of them or TransferCapacityError."""
        runs = [run for _ in range(count) if (run := self.alloc(num_bytes)) is not None]
        if len(runs) < count:
            for run in runs:
                self.free(run)
            free = self.free_pages * self.page_bytes
            raise TransferCapacityError(f"pool cannot hold {count} x {num_bytes} B ({free} B free)")
        return runs

    def free(self, run: Run) -> None:
        i = bisect.bisect(self._free, run)
        self._free.insert(i, run)
        if i + 1 < len(self._free) and sum(self._free[i]) == self._free[i + 1][0]:
            self._free[i] = (self._free[i][0], self._free[i][1] + self._free.pop(i + 1)[1])
        if i > 0 and sum(self._free[i - 1]) == self._free[i][0]:
            self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free.pop(i)[1])

    def view(self, run: Run, num_bytes: int) -> torch.Tensor:
        return self.tensor[run[0] * self.page_bytes :][:num_bytes]


class NixlTransport:
    name = "nixl"

    def __init__(
        self,
        staging_bytes: int = 256 * 2**20,
        page_bytes: int | None = None,
        lease_s: float = 60.0,
        agent_name: str | None = None,
    ) -> None:
        page_bytes = page_bytes or DEFAULT_PAGE_BYTES
        if lease_s <= 2 * (XFER_TIMEOUT_S + _CLOCK_SKEW_S):
            raise ValueError(f"lease_s={lease_s} must exceed 2 x (READ timeout + clock skew)")
        if page_bytes % 64 or not 0 < page_bytes <= staging_bytes:
            raise ValueError(f"page_bytes={page_bytes} must be a multiple of 64 within the pool")
        self.agent_name = agent_name or f"dps-{uuid.uuid4().hex[:12]}"
        self.lease_s = lease_s
        self._lock = threading.Lock()
        self._pool = _PagePool(staging_bytes, page_bytes)
        config = nixl_agent_config(enable_prog_thread=False, backends=["UCX"])
        self._agent = nixl_agent(self.agent_name, config)
        self._reg = self._agent.register_memory(self._pool.tensor)
        self._metadata = self._agent.get_agent_metadata()
        self._peers: set[str] = set()
        self._outgoing: dict[str, tuple[list[Run], float]] = {}  # id -> (runs, expiry)
        self._leases: dict[str, float] = {}  # incoming id -> renewed-until (unix, ours)
        self._closed = False
        self._pump_until = 0.0
        self._wake = threading.Event()  # set while the pump should run
        self._pump = threading.Thread(target=self._pump_loop, daemon=True)
        self._pump.start()

    @property
    def free_bytes(self) -> int:
        with self._lock:
            return self._pool.free_pages * self._pool.page_bytes

    def send(self, transfer_id: str, layers: Sequence[torch.Tensor]) -> KVDescriptor:
        if not layers:
            raise ValueError("nothing to send")
        shape, dtype = tuple(layers[0].shape), layers[0].dtype
        if any(tuple(t.shape) != shape or t.dtype != dtype for t in layers):
            raise ValueError("all layers must share one shape and dtype")
        layer_bytes = layers[0].numel() * layers[0].element_size()
        with self._lock:
            self._check_open()
            self._reap_locked()
            if transfer_id in self._outgoing:
                raise ValueError(f"transfer {transfer_id!r} is already staged")
            runs = self._pool.alloc_runs(layer_bytes, len(layers))
            self._outgoing[transfer_id] = (runs, time.monotonic() + self.lease_s)
            self._wake.set()
        try:
            for layer, run in zip(layers, runs, strict=True):
                self._pool.view(run, layer_bytes).view(dtype).view(shape).copy_(layer)
        except BaseException:
            with self._lock:
                self._free_outgoing_locked(transfer_id)
            raise
        base = self._pool.tensor.data_ptr()
        segments = tuple((base + r[0] * self._pool.page_bytes, layer_bytes) for r in runs)
        return KVDescriptor(
            transport=self.name,
            transfer_id=transfer_id,
            num_layers=len(layers),
            layer_shape=shape,
            dtype=str(dtype).removeprefix("torch."),
            payload=NixlPayload(
                self.agent_name,
                self._metadata,
                segments,
                time.time() + self.lease_s,
                self.lease_s,
            ),
        )

    def poll(self) -> None:
        """Progress the agent and free the pages of released (or expired) transfers; cheap."""
        with self._lock:
            if not self._closed:
                self._reap_locked()

    def renew(self, descriptor: KVDescriptor) -> None:
        """Ask the sender to keep this transfer's pages one more lease (a receiver that is
        still waiting to read them). Counts here only while the current lease leaves a READ
        timeout and clock skew to spare, so the renewal surely lands before the pages go.

        Raises:
            TransferExpiredError: too late: the pages may be freed (recompute instead).
        """
        payload: NixlPayload = descriptor.payload
        tid = descriptor.transfer_id
        self._check_fresh(payload, tid)
        with self._lock:
            self._check_open()
            if payload.agent == self.agent_name:  # our own transfer (tests, one process)
                runs, expiry = self._outgoing.get(tid, ([], 0.0))
                if runs:
                    self._outgoing[tid] = (runs, max(expiry, time.monotonic() + self.lease_s))
            else:
                self._connect_locked(payload)
                self._agent.send_notif(payload.agent, _RENEW + tid.encode())
                self._pump_until = time.monotonic() + _NOTIF_LINGER_S
                self._wake.set()
            self._leases[tid] = time.time() + payload.lease_s

    def lease_left_s(self, descriptor: KVDescriptor) -> float:
        """Seconds until the transfer's pages may be freed, as this receiver knows it."""
        payload: NixlPayload = descriptor.payload
        until = max(payload.expires_at_unix, self._leases.get(descriptor.transfer_id, 0.0))
        return until - time.time()

    def recv(self, descriptor: KVDescriptor) -> Iterator[torch.Tensor]:
        payload: NixlPayload = descriptor.payload
        self._renew_if_due(descriptor)
        dtype = getattr(torch, descriptor.dtype)
        layer_bytes = payload.layers[0][1]
        with self._lock:
            self._check_open()
            peer = self._connect_locked(payload)
            runs = self._pool.alloc_runs(layer_bytes, min(2, descriptor.num_layers))
        buffers = [self._pool.view(run, layer_bytes) for run in runs]
        pending: nixl_xfer_handle | None = None
        try:
            pending = self._post_read(peer, payload.layers[0], buffers[0])
            for i in range(descriptor.num_layers):
                handle, pending = pending, None
                self._wait(handle)
                if i + 1 < descriptor.num_layers:
                    self._renew_if_due(descriptor)
                    pending = self._post_read(peer, payload.layers[i + 1], buffers[(i + 1) % 2])
                yield buffers[i % 2].view(dtype).view(descriptor.layer_shape)
        finally:
            if pending is not None:  # closed early: the buffer is still being written
                try:
                    self._wait(pending)
                except Exception:
                    logger.exception("in-flight READ of %s failed on close", descriptor.transfer_id)
            with self._lock:
                for run in runs:
                    self._pool.free(run)
            self.release(descriptor)

    def release(self, descriptor: KVDescriptor) -> None:
        payload: NixlPayload = descriptor.payload
        tid = descriptor.transfer_id
        with self._lock:
            self._leases.pop(tid, None)
            if self._closed:
                return
            if payload.agent == self.agent_name:  # our own transfer: no message needed
                self._free_outgoing_locked(tid)
                return
            try:
                self._connect_locked(payload)
                self._agent.send_notif(payload.agent, _RELEASE + tid.encode())
            except Exception:  # the sender may be gone; its pages expire on their own
                logger.warning("could not notify %s to release %s", payload.agent, tid)
            self._pump_until = time.monotonic() + _NOTIF_LINGER_S
            self._wake.set()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._outgoing.clear()
            self._wake.set()  # let the pump see `_closed`
            self._agent.deregister_memory(self._reg)
        self._pump.join(timeout=1.0)

    def _renew_if_due(self, descriptor: KVDescriptor) -> None:
        """Before a READ: renew once half the lease is gone; refuse if it may run out."""
        left = self.lease_left_s(descriptor)
        if left < descriptor.payload.lease_s / 2:
            self.renew(descriptor)  # raises TransferExpiredError when already too late
        else:
            self._check_fresh(descriptor.payload, descriptor.transfer_id)

    def _check_fresh(self, payload: NixlPayload, transfer_id: str) -> None:
        """Refuse to post a READ (or count a renewal) that could still be in flight when the
        sender's pages expire.

        NOTE: a margin of one READ timeout plus clock skew between nodes.
        """
        until = max(payload.expires_at_unix, self._leases.get(transfer_id, 0.0))
        if time.time() + XFER_TIMEOUT_S + _CLOCK_SKEW_S >= until:
            raise TransferExpiredError(f"KV transfer {transfer_id} expired before it was read")

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("NixlTransport is closed")

    def _free_outgoing_locked(self, transfer_id: str) -> None:
        for run in self._outgoing.pop(transfer_id, ([], 0.0))[0]:
            self._pool.free(run)

    def _reap_locked(self) -> None:
        now = time.monotonic()
        for msgs in self._agent.get_new_notifs().values():
            for msg in msgs:
                if msg.startswith(_RELEASE):
                    self._free_outgoing_locked(msg[len(_RELEASE) :].decode())
                elif msg.startswith(_RENEW):
                    tid = msg[len(_RENEW) :].decode()
                    if tid in self._outgoing:  # not yet expired: one more lease
                        runs, expiry = self._outgoing[tid]
                        self._outgoing[tid] = (runs, max(expiry, now + self.lease_s))
        for tid in [tid for tid, (_, expiry) in self._outgoing.items() if expiry < now]:
            logger.warning("transfer %s expired unreleased: freeing its pages", tid)
            self._free_outgoing_locked(tid)

    def _pump_loop(self) -> None:
        while self._wake.wait():
            with self._lock:
                if self._closed:
                    return
                try:
                    self._reap_locked()
                except Exception:
                    logger.exception("NIXL progress failed on %s", self.agent_name)
                if not self._outgoing and time.monotonic() > self._pump_until:
                    self._wake.clear()
            time.sleep(_PUMP_INTERVAL_S)

    def _connect_locked(self, payload: NixlPayload) -> str:
        if payload.agent != self.agent_name and payload.agent not in self._peers:
            self._agent.add_remote_agent(payload.metadata)
            self._peers.add(payload.agent)
        return payload.agent

    def _post_read(self, peer: str, src: Segment, dst: torch.Tensor) -> nixl_xfer_handle:
        """Start one READ of the remote `src` into the local `dst` (same length)."""
        with self._lock:
            self._check_open()
            local_descs = self._agent.get_xfer_descs([(dst.data_ptr(), src[1], 0)], "DRAM")
            remote_descs = self._agent.get_xfer_descs([(src[0], src[1], 0)], "DRAM")
            handle = self._agent.initialize_xfer("READ", local_descs, remote_descs, peer)
            self._agent.transfer(handle)  # an "ERR" here shows again in `_wait`
        return handle

    def _wait(self, handle: nixl_xfer_handle) -> None:
        """Poll `handle` to DONE (and release it); raise on ERR or after XFER_TIMEOUT_S."""
        start = time.monotonic()
        try:
            while True:
                with self._lock:
                    state = self._agent.check_xfer_state(handle)
                if state == "DONE":
                    return
                if state == "ERR":
                    raise RuntimeError("NIXL READ failed")
                waited = time.monotonic() - start
                if waited > XFER_TIMEOUT_S:
                    raise TimeoutError(f"NIXL READ not done in {XFER_TIMEOUT_S} s")
                if waited > _SPIN_S:
                    time.sleep(1e-4)
        finally:
            with self._lock:
                self._agent.release_xfer_handle(handle)
