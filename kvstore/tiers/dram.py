"""Tier 1: a node's DRAM blocks, an LRU over opaque handles with a byte capacity.

The values are whatever the owner stores: Ray ObjectRefs in the TrafficManager (the objects
live in the node's object store and are owned by that long-lived actor, so they outlive the
engine that wrote them; a reader on the same node gets them zero-copy), plain tensors in
tests. Pure: no Ray, no I/O. Evicted entries keep their values (`drain_evicted`) so the
owner can spill them to NVMe and update the index. A `kvstore.tiers.base.Tier`.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

from kvstore.tiers.base import Evicted

V = TypeVar("V")


class DRAMTier(Generic[V]):
    """LRU by last `put`/`get`; `capacity_bytes=0` keeps nothing (a pure staging buffer).
    Every block counts `block_nbytes` (the values are handles: their size is the block's)."""

    def __init__(self, capacity_bytes: int, block_nbytes: int):
        self.capacity_bytes = capacity_bytes
        self.block_nbytes = block_nbytes
        self.usage_bytes = 0
        self._blocks: OrderedDict[bytes, V] = OrderedDict()
        self._evicted: list[Evicted[V]] = []
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def contains(self, key: bytes) -> bool:
        return key in self._blocks

    def keys(self) -> list[bytes]:
        """Least recently used first."""
        return list(self._blocks)

    def get(self, key: bytes) -> V | None:
        if key not in self._blocks:
            self.misses += 1
            return None
        self._blocks.move_to_end(key)
        self.hits += 1
        return self._blocks[key]

    def put(self, key: bytes, value: V) -> bool:
        """Store (or refresh) a block; what had to leave goes to `drain_evicted`, least
        recent first. A block larger than the whole capacity is not kept (False): it is
        listed as evicted, so the owner spills it too."""
        nbytes = self.block_nbytes
        if key in self._blocks:
            del self._blocks[key]
            self.usage_bytes -= nbytes
        if nbytes > self.capacity_bytes:
            self._evicted.append(Evicted(key, value, nbytes))
            return False
        self._blocks[key] = value
        self.usage_bytes += nbytes
        while self.usage_bytes > self.capacity_bytes:
            old_key, old_value = self._blocks.popitem(last=False)
            self.usage_bytes -= nbytes
            self.evictions += 1
            self._evicted.append(Evicted(old_key, old_value, nbytes))
        return True

    def delete(self, key: bytes) -> bool:
        if key not in self._blocks:
            return False
        del self._blocks[key]
        self.usage_bytes -= self.block_nbytes
        return True

    def drain_evicted(self) -> list[Evicted[V]]:
        out, self._evicted = self._evicted, []
        return out

    def stats(self) -> dict[str, int]:
        return {
            "blocks": len(self._blocks),
            "bytes": self.usage_bytes,
            "capacity_bytes": self.capacity_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
        }
