"""Tier 1: a node's DRAM blocks, an LRU over opaque handles with a byte capacity.

The values are whatever the owner stores: Ray ObjectRefs in the TrafficManager (the objects
live in the node's object store and are owned by that long-lived actor, so they outlive the
engine that wrote them; a reader on the same node gets them zero-copy), plain tensors in
tests. Pure: no Ray, no I/O. Eviction hands the evicted entries back so the owner can spill
them to NVMe and update the index.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Generic, TypeVar

V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Evicted(Generic[V]):
    key: bytes
    value: V
    nbytes: int


class DRAMTier(Generic[V]):
    """LRU by last `put`/`get`; `capacity_bytes=0` keeps nothing (a pure staging buffer)."""

    def __init__(self, capacity_bytes: int):
        self.capacity_bytes = capacity_bytes
        self.usage_bytes = 0
        self._blocks: OrderedDict[bytes, tuple[V, int]] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    def lru_order(self) -> list[bytes]:
        """Least recently used first."""
        return list(self._blocks)

    def get(self, key: bytes) -> V | None:
        item = self._blocks.get(key)
        if item is None:
            self.misses += 1
            return None
        self._blocks.move_to_end(key)
        self.hits += 1
        return item[0]

    def put(self, key: bytes, value: V, nbytes: int) -> list[Evicted[V]]:
        """Store (or refresh) a block; returns what had to leave, least recent first.

        A block larger than the whole capacity is not kept (it is returned as evicted).
        """
        old = self._blocks.pop(key, None)
        if old is not None:
            self.usage_bytes -= old[1]
        if nbytes > self.capacity_bytes:
            return [Evicted(key, value, nbytes)]
        self._blocks[key] = (value, nbytes)
        self.usage_bytes += nbytes
        evicted: list[Evicted[V]] = []
        while self.usage_bytes > self.capacity_bytes:
            old_key, (old_value, old_bytes) = self._blocks.popitem(last=False)
            self.usage_bytes -= old_bytes
            self.evictions += 1
            evicted.append(Evicted(old_key, old_value, old_bytes))
        return evicted

    def stats(self) -> dict[str, int]:
        return {
            "blocks": len(self._blocks),
            "bytes": self.usage_bytes,
            "capacity_bytes": self.capacity_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
        }
