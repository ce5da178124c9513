"""`python -m ops kv stats | ls | verify` on a real NVMe tier directory written through
NVMeTier (small blocks, no fsync); CPU only, no Ray."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest
import torch

from kvstore.tiers.nvme import NVMeTier, temp_file_name
from ops.kvtool import add_parsers

F32 = (2, 2, 16, 2, 8)  # [layers, 2, block_size, kv_heads, head_dim]
BF16 = (3, 2, 16, 1, 8)
CLEAN = {"ok": 0, "corrupt": 0, "truncated": 0, "unreadable": 0, "gone": 0, "deleted": 0}


def kv(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_parsers(sub)
    args = parser.parse_args(["kv", *argv])
    return args.func(args)


@pytest.fixture
def tier(tmp_path: Path) -> tuple[Path, NVMeTier, list[bytes]]:
    root = tmp_path / "kv"
    nvme = NVMeTier(root, fsync=False)
    keys = [bytes([i]) * 16 for i in range(5)]
    for i, key in enumerate(keys):
        shape, dtype = (F32, torch.float32) if i < 3 else (BF16, torch.bfloat16)
        assert nvme.put(key, torch.randn(shape).to(dtype))
    return root, nvme, keys


def cells(out: str, label: str) -> list[str]:
    """The cells of the first table row whose text holds `label`."""
    line = next(line for line in out.splitlines() if label in line)
    return [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]


def verify_counts(out: str) -> dict[str, int]:
    lines = out.splitlines()
    i = next(i for i, line in enumerate(lines) if "corrupt" in line and "┃" in line)
    head = [c.strip() for c in lines[i].split("┃")[1:-1]]
    return dict(zip(head, map(int, lines[i + 2].split("│")[1:-1]), strict=True))


def test_stats_counts_blocks_shapes_and_temp_files(tier, capsys):
    """stats counts blocks by dtype and shape and an orphan temp file, removing nothing."""
    root, _, keys = tier
    tmp = root / "00" / temp_file_name(keys[0], pid=1 << 30)  # no such pid: an orphan
    tmp.write_bytes(b"partial")
    assert kv("stats", "--path", str(root)) == 0
    out = capsys.readouterr().out
    assert cells(out, "blocks ")[1] == "5"
    assert cells(out, "bad header")[1] == "0"
    assert cells(out, "temp files")[1] == "1 (7 B)"
    assert cells(out, "orphans")[1] == "1"
    assert cells(out, "filesystem free")[1].endswith("B")
    assert cells(out, "float32 ") == ["float32", "2 × 2 × 8", "16", "2×2×16×2×8", "3", "12.6 KiB"]
    assert cells(out, "bfloat16")[:5] == ["bfloat16", "3 × 1 × 8", "16", "3×2×16×1×8", "2"]
    assert tmp.exists()  # read-only: unlike opening an NVMeTier, stats removes nothing


def test_ls_rows_limit_and_sort(tier, capsys):
    """ls shows one row per block; --limit and --sort size pick the largest first."""
    root, _, keys = tier
    assert kv("ls", "--path", str(root), "--limit", "0") == 0
    out = capsys.readouterr().out
    assert "5 of 5 blocks" in out
    assert all(key.hex()[:12] in out for key in keys)
    assert out.count("float32") == 3 and out.count("bfloat16") == 2
    assert kv("ls", "--path", str(root), "--limit", "2", "--sort", "size") == 0
    out = capsys.readouterr().out
    assert "2 of 5 blocks" in out and out.count("…") == 2
    assert out.count("2×2×16×2×8") == 2 and "bfloat16" not in out  # the f32 blocks are larger


def test_verify_reports_corrupt_and_truncated_then_deletes_them(tier, capsys):
    """A flipped payload byte and a cut file are both named and exit 1; --delete removes
    exactly them, so the tier reopens clean."""
    root, nvme, keys = tier
    assert kv("verify", "--path", str(root)) == 0
    assert verify_counts(capsys.readouterr().out) == {**CLEAN, "ok": 5}

    flipped, cut = nvme.path_of(keys[1]), nvme.path_of(keys[3])
    data = bytearray(flipped.read_bytes())
    data[-3] ^= 0x10  # a payload byte
    flipped.write_bytes(data)
    os.truncate(cut, cut.stat().st_size // 2)
    assert kv("verify", "--path", str(root)) == 1
    out = capsys.readouterr().out
    assert verify_counts(out) == {**CLEAN, "ok": 3, "corrupt": 1, "truncated": 1}
    assert re.search(rf"^corrupt\s+{re.escape(str(flipped))}\s+payload checksum", out, re.M)
    assert re.search(rf"^truncated\s+{re.escape(str(cut))}\s", out, re.M)
    assert flipped.exists() and cut.exists()  # no --delete: nothing removed
    assert kv("stats", "--path", str(root)) == 0  # headers only: sees the truncated file
    out = capsys.readouterr().out
    assert (cells(out, "blocks ")[1], cells(out, "bad header")[1]) == ("4", "1")

    assert kv("verify", "--path", str(root), "--delete") == 1
    assert verify_counts(capsys.readouterr().out)["deleted"] == 2
    assert not flipped.exists() and not cut.exists()
    assert kv("verify", "--path", str(root)) == 0
    assert verify_counts(capsys.readouterr().out) == {**CLEAN, "ok": 3}
    assert NVMeTier(root, fsync=False).verify_all() == (3, [])


def test_verify_flags_a_block_stored_under_another_name(tier, capsys):
    """A valid block under the wrong file name would serve wrong KV for that key: corrupt."""
    root, nvme, keys = tier
    moved = nvme.path_of(bytes([9]) * 16)
    moved.parent.mkdir()
    nvme.path_of(keys[0]).rename(moved)
    assert kv("verify", "--path", str(root)) == 1
    assert re.search(r"^corrupt\s+.*key mismatch", capsys.readouterr().out, re.M)


def test_missing_directory_is_exit_2(tmp_path, capsys):
    """A mistyped --path is an error (2), not an empty, healthy tier."""
    for cmd in ("stats", "ls", "verify"):
        assert kv(cmd, "--path", str(tmp_path / "nope")) == 2
    assert "no such directory" in capsys.readouterr().err


def test_default_path_from_env(tier, monkeypatch, capsys):
    """Without --path the tool reads $DUALPATH_KV_DIR, as the app does."""
    root, _, _ = tier
    monkeypatch.setenv("DUALPATH_KV_DIR", str(root))
    assert kv("ls") == 0
    assert "5 of 5 blocks" in capsys.readouterr().out
