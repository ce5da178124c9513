"""The Tier contract (kvstore/tiers/base.py), checked on DRAM and NVMe with the same calls."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvstore.keys import KEY_BYTES
from kvstore.tiers.base import Tier
from kvstore.tiers.dram import DRAMTier
from kvstore.tiers.nvme import NVMeTier

BLOCKS = [torch.full((4, 8), float(i)) for i in range(3)]


def key(i: int) -> bytes:
    return bytes([i + 1]) * KEY_BYTES


def tier_for_two_blocks(kind: str, root: Path) -> Tier[torch.Tensor]:
    if kind == "dram":
        nbytes = BLOCKS[0].numel() * BLOCKS[0].element_size()
        return DRAMTier(2 * nbytes, nbytes)
    probe = NVMeTier(root / "probe", fsync=False)
    probe.put(key(0), BLOCKS[0])
    size = probe.usage_bytes  # a block file: header + payload
    return NVMeTier(root / "tier", capacity_bytes=2 * size + size // 2, fsync=False)


@pytest.mark.parametrize("kind", ["dram", "nvme"])
def test_both_tiers_answer_the_same_calls_the_same_way(kind: str, tmp_path: Path):
    """The store drives either tier through one interface, so both must agree: a hit is
    a use (LRU), what leaves for room is drained oldest first, a miss is None."""
    tier = tier_for_two_blocks(kind, tmp_path)
    assert tier.put(key(0), BLOCKS[0]) and tier.put(key(1), BLOCKS[1])
    assert torch.equal(tier.get(key(0)), BLOCKS[0])  # 0 is now the most recent
    assert tier.keys() == [key(1), key(0)] and tier.drain_evicted() == []
    assert tier.put(key(2), BLOCKS[2])
    assert [e.key for e in tier.drain_evicted()] == [key(1)] and tier.drain_evicted() == []
    assert tier.get(key(1)) is None and not tier.contains(key(1))
    assert tier.delete(key(0)) and not tier.delete(key(0))
    assert tier.keys() == [key(2)] and tier.contains(key(2))


def test_dram_hands_back_what_it_could_not_keep():
    """A block larger than the whole DRAM tier is not kept but listed as evicted, with its
    handle, so that the owner spills it to NVMe like any other."""
    tier: DRAMTier[str] = DRAMTier(0, 16)
    assert tier.put(key(0), "handle") is False and not tier.contains(key(0))
    (evicted,) = tier.drain_evicted()
    assert (evicted.key, evicted.value, evicted.nbytes) == (key(0), "handle", 16)
