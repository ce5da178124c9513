"""KVIndex: which stored blocks exist, in which tier (and on which node's DRAM), how big.

Pure (no Ray, no I/O, no clock of its own). The Scheduler holds one index for the whole
cluster, fed by `IndexEvent`s that each node's store emits. Keys are hash chains
(kvstore.keys), so a prompt's longest stored prefix is a walk over its keys in order: the
first key that is absent ends the prefix (a later key cannot be valid without it).

Restart: the index is soft state. A restarted Scheduler asks every node for a full resync
(`TieredStore.snapshot_events`), and the NVMe tier itself is rebuilt from its directory.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum


class TierName(StrEnum):
    """Where a stored block lives (the tiers outside the engine)."""

    DRAM = "dram"  # a node's object store (`IndexEvent.node_id` names the node)
    NVME = "nvme"  # the NVMe tier's directory, shared by every node


@dataclass(frozen=True, slots=True)
class IndexEvent:
    key: bytes
    tier: TierName
    present: bool  # False: the block left that tier (evicted, corrupt, deleted)
    node_id: str = ""  # for "dram": the node whose object store holds it
    nbytes: int = 0


@dataclass(slots=True)
class IndexEntry:
    nbytes: int = 0
    on_nvme: bool = False
    dram_nodes: set[str] = field(default_factory=set)
    last_use: float = 0.0

    @property
    def is_stored(self) -> bool:
        return self.on_nvme or bool(self.dram_nodes)


class KVIndex:
    def __init__(self) -> None:
        self.entries: dict[bytes, IndexEntry] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def apply(self, events: Iterable[IndexEvent], now: float = 0.0) -> None:
        for event in events:
            entry = self.entries.get(event.key)
            if entry is None:
                if not event.present:
                    continue
                entry = self.entries[event.key] = IndexEntry(last_use=now)
            if event.nbytes:
                entry.nbytes = event.nbytes
            if event.tier == TierName.NVME:
                entry.on_nvme = event.present
            elif event.present:
                entry.dram_nodes.add(event.node_id)
            else:
                entry.dram_nodes.discard(event.node_id)
            if not entry.is_stored:
                del self.entries[event.key]

    def drop_node(self, node_id: str) -> None:
        """A node's DRAM tier is gone (its TrafficManager restarted)."""
        for key in [k for k, e in self.entries.items() if node_id in e.dram_nodes]:
            self.apply([IndexEvent(key, TierName.DRAM, False, node_id)])

    def longest_prefix(
        self, keys: Sequence[bytes], now: float | None = None, nodes: set[str] | None = None
    ) -> int:
        """How many leading `keys` are stored; touches them when `now` is given.

        With `nodes`, a block counts only if it is on NVMe (readable by every node) or in the
        DRAM tier of one of `nodes` (another node's DRAM is not readable from here).
        """
        n = 0
        for key in keys:
            entry = self.entries.get(key)
            if (
                entry is None
                or nodes is not None
                and not (entry.on_nvme or entry.dram_nodes & nodes)
            ):
                break
            if now is not None:
                entry.last_use = now
            n += 1
        return n

    def locate(
        self, keys: Sequence[bytes], nodes: set[str] | None = None, now: float | None = None
    ) -> list[IndexEntry]:
        """The entries of the longest stored prefix of `keys` (readable from one of `nodes`,
        as in `longest_prefix`), so a caller can see where each block lives."""
        n = self.longest_prefix(keys, now, nodes)
        return [self.entries[key] for key in keys[:n]]

    def stats(self) -> dict[str, int]:
        entries = self.entries.values()
        return {
            "blocks": len(self.entries),
            "bytes": sum(e.nbytes for e in entries),
            "nvme_blocks": sum(1 for e in entries if e.on_nvme),
            "dram_blocks": sum(1 for e in entries if e.dram_nodes),
        }
