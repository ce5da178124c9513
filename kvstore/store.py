"""TieredStore: one node's KV store — its DRAM tier, the NVMe tier behind its storage NIC.

    load(keys)        the longest prefix of `keys` that can be served, as DRAM handles:
                      DRAM and write-buffer hits at once, the rest read from NVMe through
                      the SNIC (READ class, all submitted together); the first missing or
                      corrupt block ends the prefix, so the caller recomputes from there —
                      never wrong KV.
    persist(key, kv)  DRAM now, NVMe in the background through the SNIC (WRITE class);
                      blocks already stored anywhere are skipped. Until its write lands a
                      block stays in the write buffer, served from there and announced as
                      held in this node's DRAM: a write that lags (the SNIC busy with
                      reads) never costs a hit.
    evictions         LRU in DRAM; a block leaving DRAM that is not on NVMe yet is spilled.
    events            every change of where a block lives becomes an IndexEvent, drained by
                      the owner and sent to the cluster index (the Scheduler's KVIndex).

The DRAM handle type is the owner's choice (`wrap`/`unwrap`): Ray ObjectRefs in the
TrafficManager, tensors in tests. No Ray here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from functools import partial
from typing import Generic, TypeVar

import torch

from kvstore.index import IndexEvent, TierName
from kvstore.snic import IOClass, StorageNIC
from kvstore.tiers.base import Evicted, Tier
from kvstore.tiers.nvme import NVMeTier

logger = logging.getLogger(__name__)

V = TypeVar("V")


class TieredStore(Generic[V]):
    def __init__(
        self,
        node_id: str,
        dram: Tier[V],
        nvme: NVMeTier | None,
        snic: StorageNIC,
        *,
        wrap: Callable[[torch.Tensor], V],
        unwrap: Callable[[V], torch.Tensor],
        block_size: int,
        block_nbytes: int,
        max_pending_writes: int = 1024,
        read_timeout_s: float | None = None,
    ):
        self.node_id = node_id
        self.dram = dram
        self.nvme = nvme
        self.snic = snic
        self.wrap = wrap
        self.unwrap = unwrap
        self.block_size = block_size
        self.block_nbytes = block_nbytes
        self.max_pending_writes = max_pending_writes
        self.read_timeout_s = read_timeout_s  # a load waits this long at most (slow disk)
        self._lock = threading.Lock()
        self._pending_writes: dict[bytes, Future[None]] = {}
        self._buffered: dict[bytes, V] = {}  # handles of blocks whose NVMe write is pending
        self._events: list[IndexEvent] = []
        self.counters = {
            "loads": 0,
            "loads_cancelled": 0,
            "read_timeouts": 0,
            "blocks_from_dram": 0,
            "blocks_from_write_buffer": 0,
            "blocks_from_nvme": 0,
            "blocks_pulled": 0,  # served from this node's DRAM to loads on other nodes
            "load_misses": 0,
            "corrupt_or_missing": 0,
            "persisted": 0,
            "persist_skipped": 0,
            "persist_dropped": 0,
            "spilled": 0,
        }

    # ------------------------------------------------------------------ reads
    def load(
        self,
        keys: Sequence[bytes],
        cancel: threading.Event | None = None,
        on_queued: Callable[[], None] | None = None,
        dram_only: bool = False,
    ) -> list[V]:
        """The longest servable prefix of `keys`, as DRAM handles, in order. Once `cancel`
        is set (the request is gone), or `read_timeout_s` has passed (a stalled disk), it
        stops waiting and drops its reads still queued on the SNIC, returning what it has
        (the rest is recomputed). `on_queued` runs once its reads are on the SNIC's queue.

        `dram_only`: a pull by another node (it fetches the handles through the object
        store): only what this node's DRAM (or write buffer) holds, never an SNIC read."""
        handles: list[V | None] = []
        reads: dict[int, Future[torch.Tensor | None]] = {}
        known: dict[int, bool] = {}
        buffered = 0
        with self._lock:
            self.counters["loads"] += 1
            for i, key in enumerate(keys):
                handle = self.dram.get(key)
                if handle is None and (handle := self._buffered.get(key)) is not None:
                    buffered += 1
                if handle is None and dram_only:
                    break
                if handle is None:
                    # NOTE: no index check: on a shared directory another node may have
                    # written the block; the read itself finds out (a miss ends the prefix).
                    if self.nvme is None:
                        self.counters["load_misses"] += 1
                        break
                    known[i] = self.nvme.contains(key)
                    reads[i] = self.snic.submit(
                        IOClass.READ,
                        self.block_nbytes,
                        partial(self.nvme.get, key),
                        num_tokens=self.block_size,
                    )
                handles.append(handle)
            self.counters["blocks_from_write_buffer"] += buffered
            if dram_only:
                self.counters["blocks_pulled"] += len(handles)
        if on_queued is not None:
            on_queued()
        out: list[V] = []
        deadline = None if self.read_timeout_s is None else time.monotonic() + self.read_timeout_s
        for i, handle in enumerate(handles):
            if handle is None:
                block = _result(reads.pop(i), cancel, deadline)
                if block is _CANCELLED or block is _TIMED_OUT:
                    reason = "loads_cancelled" if block is _CANCELLED else "read_timeouts"
                    with self._lock:
                        self.counters[reason] += 1
                    break
                if block is None:  # corrupt, vanished or not written yet: the prefix ends here
                    self._note_missing(keys[i], known[i])
                    break
                handle = self.wrap(block)  # type: ignore[arg-type]
                with self._lock:
                    self.counters["blocks_from_nvme"] += 1
                    self._cache(keys[i], handle, self.block_nbytes)
            else:
                with self._lock:
                    self.counters["blocks_from_dram"] += 1
            out.append(handle)
        for future in reads.values():  # reads past the end of the prefix are not needed
            future.cancel()
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------------ writes
    def persist(self, key: bytes, block: torch.Tensor) -> bool:
        """Store a Full Block: DRAM now, NVMe in the background. False if already stored,
        or dropped because `max_pending_writes` blocks already wait for the SNIC."""
        with self._lock:
            if self.dram.contains(key) or key in self._pending_writes or self._on_disk(key):
                self.counters["persist_skipped"] += 1
                return False
            if len(self._pending_writes) >= self.max_pending_writes:
                self.counters["persist_dropped"] += 1  # back-pressure: memory stays bounded
                return False
        handle = self.wrap(block)  # NOTE: outside the lock: on-path loads do not wait for it
        with self._lock:
            if self.dram.contains(key) or key in self._pending_writes:
                return False  # persisted concurrently
            self.counters["persisted"] += 1
            # NOTE: queue the write before caching: a block that leaves DRAM at once (a small
            # tier) must not be spilled as a second write of the same bytes.
            self._write_behind(key, block, handle)
            self._cache(key, handle, self.block_nbytes)
        return True

    def flush(self, timeout_s: float | None = None) -> None:
        """Wait until every queued NVMe write has finished (tests, shutdown)."""
        with self._lock:
            pending = list(self._pending_writes.values())
        for future in pending:
            future.exception(timeout=timeout_s)

    # ------------------------------------------------------------------ index events
    def drain_events(self) -> list[IndexEvent]:
        with self._lock:
            events, self._events = self._events, []
        return events

    def snapshot_events(self) -> list[IndexEvent]:
        """Every block this node knows, as 'present' events (a full index resync)."""
        with self._lock:
            events = [
                IndexEvent(k, TierName.DRAM, True, self.node_id, self.block_nbytes)
                for k in [*self.dram.keys(), *self._buffered]
            ]
            if self.nvme is not None:
                stored, nbytes = self.nvme.keys(), self.block_nbytes
                events += [IndexEvent(k, TierName.NVME, True, "", nbytes) for k in stored]
        return events

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {
                "node_id": self.node_id,
                "block_nbytes": self.block_nbytes,
                "dram": self.dram.stats(),
                "nvme": self.nvme.stats() if self.nvme is not None else None,
                "pending_writes": len(self._pending_writes),
                "write_buffer_blocks": len(self._buffered),
                **self.counters,
            }

    # ------------------------------------------------------------------ internals (lock held)
    def _cache(self, key: bytes, handle: V, nbytes: int) -> None:
        if self.dram.put(key, handle):
            self._events.append(IndexEvent(key, TierName.DRAM, True, self.node_id, nbytes))
        for item in self.dram.drain_evicted():
            self._spill(item)
            if item.key != key and item.key not in self._buffered:  # no longer held here
                self._events.append(IndexEvent(item.key, TierName.DRAM, False, self.node_id))

    def _spill(self, item: Evicted[V]) -> None:
        if self.nvme is None or item.key in self._pending_writes or self._on_disk(item.key):
            return
        assert item.value is not None  # NOTE: DRAM hands its evicted handles back
        self.counters["spilled"] += 1
        self._write_behind(item.key, self.unwrap(item.value), item.value)

    def _write_behind(self, key: bytes, block: torch.Tensor, handle: V) -> None:
        if self.nvme is None or not self.nvme.accepting_writes():
            return
        self._pending_writes[key] = self.snic.submit(
            IOClass.WRITE, self.block_nbytes, partial(self._write, key, block), self.block_size
        )
        # NOTE: lock held: the write's completion (`_write`) cannot pop it before this
        self._buffered[key] = handle
        self._events.append(IndexEvent(key, TierName.DRAM, True, self.node_id, self.block_nbytes))

    def _write(self, key: bytes, block: torch.Tensor) -> None:
        assert self.nvme is not None
        try:
            stored = self.nvme.put(key, block)
        except Exception:
            logger.warning("KV block write failed", exc_info=True, extra={"node": self.node_id})
            stored = False
        with self._lock:
            self._pending_writes.pop(key, None)
            if stored:
                self._events.append(IndexEvent(key, TierName.NVME, True, "", self.block_nbytes))
            if self._buffered.pop(key, None) is not None and not self.dram.contains(key):
                self._events.append(IndexEvent(key, TierName.DRAM, False, self.node_id))
            for gone in self.nvme.drain_evicted():
                self._events.append(IndexEvent(gone.key, TierName.NVME, False))

    def _on_disk(self, key: bytes) -> bool:
        """On NVMe, including files other nodes wrote to a shared directory (a stat)."""
        nvme = self.nvme
        return nvme is not None and (nvme.contains(key) or nvme.path_of(key).exists())

    def _note_missing(self, key: bytes, known: bool) -> None:
        """A read found no valid block. Only a block this node had indexed is reported gone
        (it was corrupt and removed, or deleted); a block another node announced may simply
        not be written yet, and must not be dropped from the cluster index."""
        with self._lock:
            self.counters["corrupt_or_missing"] += 1
            if known:
                self._events.append(IndexEvent(key, TierName.NVME, False))


_CANCELLED = object()
_TIMED_OUT = object()


def _result(
    future: Future[torch.Tensor | None], cancel: threading.Event | None, deadline: float | None
) -> object:
    """The read's block; `_CANCELLED` once `cancel` is set, `_TIMED_OUT` after `deadline`
    (monotonic), whichever comes first."""
    if cancel is None and deadline is None:
        return future.result()
    while True:
        try:
            return future.result(timeout=0.02)
        except TimeoutError:
            if cancel is not None and cancel.is_set():
                return _CANCELLED
            if deadline is not None and time.monotonic() > deadline:
                return _TIMED_OUT
