"""NVMe tier and block format: bit-exact round trips, corruption is a miss (never wrong KV),
restart, LRU capacity, threads (faults: test_nvme_faults.py).
CPU only, no Ray; every test works in its own tmp_path."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from kvstore.block import (
    BLOCK_MAGIC,
    CorruptBlockError,
    block_nbytes,
    decode_block,
    decode_header,
    encode_block,
)
from kvstore.tiers.base import Evicted
from kvstore.tiers.nvme import NVMeTier

REPO = Path(__file__).resolve().parents[2]
SHAPE = (4, 2, 64, 3, 64)  # [layers, 2, block_size, kv_heads, head_dim]
SMALL = (2, 2, 16, 2, 8)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BITS = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
KILL_CYCLES = 50  # issue 8: 50 kill-during-write cycles, 0 torn blocks
KILL_SHAPE = (4, 2, 64, 8, 64)  # 1 MiB of float32 per block: a write takes a while


def key_of(i: int) -> bytes:
    """A hash-like key that still carries `i` in its last 8 bytes (for the kill test)."""
    return hashlib.blake2b(str(i).encode(), digest_size=8).digest() + i.to_bytes(8, "big")


def make_block(seed: int, dtype: torch.dtype = torch.float32, shape=SHAPE) -> torch.Tensor:
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    flat = t.view(-1)
    flat[:4] = torch.tensor([float("nan"), float("inf"), -0.0, -float("inf")]).to(dtype)
    return t


def same_bits(a: torch.Tensor | None, b: torch.Tensor) -> bool:
    return (
        a is not None
        and a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.view(BITS[a.dtype]), b.view(BITS[b.dtype]))
    )


def tmp_files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.tmp"))


def is_writing(root: Path, first: int, num_done: int) -> bool:
    """A writer that started at `key_of(first)` has completed `num_done` blocks and has the
    next one open (its temp file exists)."""
    if not tmp_files(root):
        return False
    indexes = (int.from_bytes(bytes.fromhex(p.stem)[8:], "big") for p in root.glob("??/*.kvb"))
    return sum(i >= first for i in indexes) >= num_done


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_is_bit_exact(tmp_path: Path, dtype: torch.dtype):
    block = make_block(1, dtype)
    header, payload = encode_block(key_of(1), block)
    assert len(payload) == block_nbytes(block)
    back = decode_block(header + bytes(payload), expect_key=key_of(1))
    assert same_bits(back, block)
    back.add_(1)  # owns writable memory

    tier = NVMeTier(tmp_path)
    assert tier.put(key_of(1), block)
    assert tier.contains(key_of(1))
    assert same_bits(tier.get(key_of(1)), block)
    meta_path = tier.path_of(key_of(1))
    assert meta_path == tmp_path / key_of(1).hex()[:2] / f"{key_of(1).hex()}.kvb"
    assert tier.usage_bytes == meta_path.stat().st_size == len(header) + len(payload)


def test_header_fields_and_any_flipped_header_byte_is_detected():
    block = make_block(2, torch.bfloat16)
    header, payload = encode_block(key_of(2), block)
    h, size = decode_header(header + bytes(payload))
    assert size == len(header) and size % 64 == 0 and header[:4] == BLOCK_MAGIC
    assert (h.key, h.shape, h.dtype, h.num_layers) == (key_of(2), SHAPE, "bfloat16", 4)
    assert h.payload_bytes == block_nbytes(block)
    for pos in range(len(header)):
        bad = bytearray(header)
        bad[pos] ^= 0x01
        with pytest.raises(CorruptBlockError):
            decode_block(bytes(bad) + bytes(payload))


def test_decode_rejects_wrong_key_truncation_and_payload_flip():
    header, payload = encode_block(key_of(3), make_block(3))
    data = header + bytes(payload)
    with pytest.raises(CorruptBlockError, match="key mismatch"):
        decode_block(data, expect_key=key_of(4))
    with pytest.raises(CorruptBlockError, match="truncated"):
        decode_block(data[:-1])
    with pytest.raises(CorruptBlockError, match="truncated header"):
        decode_block(data[:7])
    bad = bytearray(data)
    bad[len(header) + 100] ^= 0x01
    with pytest.raises(CorruptBlockError, match="payload checksum"):
        decode_block(bad)


def test_flipped_payload_byte_is_a_miss_and_the_file_is_removed(tmp_path: Path):
    tier = NVMeTier(tmp_path)
    tier.put(key_of(5), make_block(5))
    path = tier.path_of(key_of(5))
    flip_byte(path, path.stat().st_size - 10)
    assert tier.get(key_of(5)) is None
    assert not path.exists() and not tier.contains(key_of(5))
    assert tier.stats()["corrupt"] == 1 and tier.usage_bytes == 0


def test_truncated_file_is_a_miss(tmp_path: Path):
    tier = NVMeTier(tmp_path)
    for i in (6, 7):
        tier.put(key_of(i), make_block(i))
    full = tier.path_of(key_of(6))
    os.truncate(full, full.stat().st_size // 2)
    assert tier.get(key_of(6)) is None and not full.exists()
    os.truncate(tier.path_of(key_of(7)), 20)  # cut inside the header: found by the scan
    assert NVMeTier(tmp_path).keys() == []
    assert not tier.path_of(key_of(7)).exists()


def test_block_under_another_keys_name_is_a_miss(tmp_path: Path):
    tier = NVMeTier(tmp_path)
    tier.put(key_of(8), make_block(8))
    wrong = tier.path_of(key_of(9))
    wrong.parent.mkdir(exist_ok=True)
    tier.path_of(key_of(8)).rename(wrong)
    assert tier.get(key_of(9)) is None and not wrong.exists()
    assert tier.contains(key_of(8))  # the index is a cache of the directory ...
    tier.rescan()  # ... rebuilt from it on demand
    assert tier.keys() == []

    tier.put(key_of(8), make_block(8))
    wrong.write_bytes(tier.path_of(key_of(8)).read_bytes())  # a copy: found by the scan
    assert NVMeTier(tmp_path).keys() == [key_of(8)] and not wrong.exists()


def test_missing_block_is_a_miss(tmp_path: Path):
    tier = NVMeTier(tmp_path)
    assert tier.get(key_of(10)) is None
    assert not tier.contains(key_of(10)) and not tier.delete(key_of(10))
    stats = tier.stats()
    assert (stats["reads"], stats["read_misses"], stats["read_hits"]) == (1, 1, 0)
    with pytest.raises(ValueError):
        tier.path_of(b"short")


def test_restart_sees_the_same_blocks(tmp_path: Path):
    blocks = {key_of(i): make_block(i, DTYPES[i % 3]) for i in range(9)}
    tier = NVMeTier(tmp_path)
    for key, block in blocks.items():
        assert tier.put(key, block)
    assert tier.put(key_of(0), blocks[key_of(0)])  # idempotent
    assert tier.stats()["writes"] == len(blocks)

    again = NVMeTier(tmp_path)
    assert sorted(again.keys()) == sorted(blocks)
    assert again.usage_bytes == tier.usage_bytes
    for key, block in blocks.items():
        assert same_bits(again.get(key), block)
    assert again.verify_all() == (len(blocks), [])


def test_delete_and_verify_all_report_corrupt_blocks(tmp_path: Path):
    tier = NVMeTier(tmp_path)
    for i in range(3):
        tier.put(key_of(i), make_block(i, shape=SMALL))
    assert tier.delete(key_of(0)) and not tier.path_of(key_of(0)).exists()
    flip_byte(tier.path_of(key_of(1)), -1)
    assert tier.verify_all() == (1, [key_of(1)])
    assert tier.keys() == [key_of(2)]


# A "zygote" imports torch once, then forks one writer per cycle (5 torch imports would
# dominate the test's time); each writer is a real process, killed with SIGKILL.
def test_capacity_evicts_least_recently_used(tmp_path: Path):
    blocks = [make_block(i, shape=SMALL) for i in range(4)]
    probe = NVMeTier(tmp_path / "probe")
    probe.put(key_of(0), blocks[0])
    size = probe.usage_bytes
    tier = NVMeTier(tmp_path / "lru", capacity_bytes=3 * size + size // 2)
    for i in range(3):
        assert tier.put(key_of(i), blocks[i])
    assert tier.drain_evicted() == []
    assert tier.get(key_of(0)) is not None  # 0 is now more recent than 1
    assert tier.put(key_of(3), blocks[3])
    assert tier.drain_evicted() == [Evicted(key_of(1), None, size)]  # its file is gone
    assert tier.drain_evicted() == []
    assert not tier.path_of(key_of(1)).exists() and tier.get(key_of(1)) is None
    assert sorted(tier.keys()) == sorted([key_of(0), key_of(2), key_of(3)])
    assert tier.usage_bytes <= tier.capacity_bytes and tier.stats()["evictions"] == 1

    tiny = NVMeTier(tmp_path / "tiny", capacity_bytes=size - 1)
    assert tiny.put(key_of(0), blocks[0]) is False and tiny.keys() == []


def test_threads_share_one_tier(tmp_path: Path):
    tier = NVMeTier(tmp_path)
    shared = {key_of(100 + i): make_block(100 + i, shape=SMALL) for i in range(4)}
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            own = {key_of(10 * t + i): make_block(10 * t + i, shape=SMALL) for i in range(6)}
            for key, block in [*own.items(), *shared.items()]:
                assert tier.put(key, block)
                assert same_bits(tier.get(key), block)
            for key, block in [*own.items(), *shared.items()]:
                assert same_bits(tier.get(key), block)
        except BaseException as e:  # reported below, from the main thread
            errors.append(e)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(worker, range(4)))
    assert errors == []
    assert len(tier.keys()) == 4 * 6 + len(shared) and tmp_files(tmp_path) == []
    assert NVMeTier(tmp_path).verify_all() == (len(tier.keys()), [])
