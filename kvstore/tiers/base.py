"""Tier: the one interface of a KV-store tier (DRAM, NVMe); its docstring is the contract."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

V = TypeVar("V")


@dataclass(frozen=True, slots=True)
class Evicted(Generic[V]):
    """A block that left a tier for capacity."""

    key: bytes
    value: V | None  # the block, where the tier can hand it back (DRAM); None on NVMe
    nbytes: int


class Tier(Protocol[V]):
    """Blocks by key (`kvstore.keys`), bounded in bytes, least recently used out first.

    - `get(key)`: the block, or None: a miss. A block that is absent, unreadable or fails
      a check is a miss (and may be removed), never wrong KV. A hit counts as a use.
    - `put(key, value)`: True when the tier holds `key` afterwards (stored now, or already
      there: not rewritten); False when it did not keep it (too big for the tier, a full
      disk). Blocks that had to leave to make room are kept for `drain_evicted`.
    - `contains(key)`: whether the tier's index holds `key`; no I/O, not a use.
    - `delete(key)`: drop `key`; True if it was there.
    - `keys()`: every key held, least recently used first.
    - `drain_evicted()`: what left for capacity since the last call, oldest first, so that
      the owner can spill it to the next tier and update the cluster index (DRAM lists a
      `put` block larger than the whole tier there too: it is spilled like the others).
    - `usage_bytes`: bytes held; `stats()`: counters for `dps status`.

    Thread safety is each tier's own: NVMeTier is thread safe; DRAMTier relies on its
    owner's lock (TieredStore's).
    """

    @property
    def usage_bytes(self) -> int: ...

    def get(self, key: bytes) -> V | None: ...

    def put(self, key: bytes, value: V) -> bool: ...

    def contains(self, key: bytes) -> bool: ...

    def delete(self, key: bytes) -> bool: ...

    def keys(self) -> list[bytes]: ...

    def drain_evicted(self) -> list[Evicted[V]]: ...

    def stats(self) -> dict[str, int | float | bool]: ...
