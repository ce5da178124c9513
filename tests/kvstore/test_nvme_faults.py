"""NVMe tier faults: kill -9 mid-write never leaves a torn block, dead writers' temp files
are removed at start, disk full disables persistence then retries, other OS errors raise.
CPU only, no Ray; every test works in its own tmp_path."""

from __future__ import annotations

import errno
import functools
import inspect
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kvstore.block import decode_block
from kvstore.tiers import nvme
from kvstore.tiers.nvme import NVMeTier, temp_file_name
from tests.helpers import wait_until
from tests.kvstore.test_nvme_tier import (
    KILL_CYCLES,
    KILL_SHAPE,
    REPO,
    SMALL,
    is_writing,
    key_of,
    make_block,
    same_bits,
    tmp_files,
)

ZYGOTE = r"""
import hashlib, os, sys
import torch
from kvstore.tiers.nvme import NVMeTier
root, shape = sys.argv[1], tuple(int(d) for d in sys.argv[2].split(","))
KEY_OF
print("ready", flush=True)
for line in sys.stdin:
    cmd, arg, fsync = line.split()
    if cmd == "reap":
        os.waitpid(int(arg), 0)
        print("reaped", flush=True)
        continue
    pid = os.fork()
    if pid == 0:
        tier = NVMeTier(root, fsync=fsync == "1")
        base = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)
        i = int(arg)
        while True:
            tier.put(key_of(i), base + i)
            i += 1
    print(pid, flush=True)
"""


def test_kill_9_during_writes_never_leaves_a_torn_block(tmp_path: Path):
    """A writer is killed at a random moment, KILL_CYCLES times (every other one with fsync);
    after each kill, every block file is whole and right, and a fresh tier lists exactly those
    with no temp file left behind."""
    base = torch.arange(torch.Size(KILL_SHAPE).numel(), dtype=torch.float32).reshape(KILL_SHAPE)
    code = ZYGOTE.replace("KEY_OF", inspect.getsource(key_of))
    zygote = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path), ",".join(map(str, KILL_SHAPE))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )

    def ask(line: str) -> str:
        zygote.stdin.write(f"{line}\n".encode())
        zygote.stdin.flush()
        return zygote.stdout.readline().decode().strip()

    rng, verified, torn = random.Random(0), set(), 0
    try:
        assert zygote.stdout.readline().strip() == b"ready"
        for cycle in range(KILL_CYCLES):
            # NOTE: without fsync most of a write's time is the write itself: more torn writes.
            first = cycle * 10**6
            pid = int(ask(f"go {first} {cycle % 2}"))
            num_done = rng.randint(0, 3)  # blocks this writer completes before its kill
            wait_until(
                functools.partial(is_writing, tmp_path, first, num_done),
                f"writer {cycle} is writing after {num_done} blocks",
                interval_s=0.001,
            )
            os.kill(pid, signal.SIGKILL)  # at a random point of that write
            assert ask(f"reap {pid} 0") == "reaped"
            # Every block file on disk, as any reader would find it, is whole and right ...
            on_disk = {bytes.fromhex(p.stem): p for p in tmp_path.glob("??/*.kvb")}
            assert verified <= on_disk.keys()  # (earlier blocks survive later kills)
            for key in on_disk.keys() - verified:
                block = decode_block(on_disk[key].read_bytes(), expect_key=key)
                i = int.from_bytes(key[8:], "big")
                assert torch.equal(block, base + i), f"block {i} is wrong"
            verified = set(on_disk)
            torn += bool(tmp_files(tmp_path))  # this kill interrupted a write
            tier = NVMeTier(tmp_path)
            assert tmp_files(tmp_path) == [] and set(tier.keys()) == verified
            assert tier.stats()["corrupt"] == 0
        assert len(verified) > 0
        assert torn >= KILL_CYCLES // 10, f"only {torn} kills landed mid-write"
    finally:
        zygote.kill()
        zygote.wait()


def test_orphan_temp_files_of_dead_writers_are_removed_at_start(tmp_path: Path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    shard = tmp_path / "ab"
    shard.mkdir()
    dead_tmp = shard / temp_file_name(key_of(1), pid=dead.pid)
    live_tmp = shard / temp_file_name(key_of(2))
    old_tmp = shard / temp_file_name(key_of(3))
    other_host = shard / f"{key_of(4).hex()}.00000000.{dead.pid}.deadbeef.tmp"
    for p in (dead_tmp, live_tmp, old_tmp, other_host):
        p.write_bytes(b"partial")
    an_hour_ago = time.time() - 3600
    os.utime(old_tmp, (an_hour_ago, an_hour_ago))

    NVMeTier(tmp_path, orphan_grace_s=60.0)
    # a live writer's young temp file stays; another host's pid is not judged here
    assert tmp_files(tmp_path) == sorted([live_tmp, other_host])


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("fail_at", ["write", "fsync"])
def test_disk_full_disables_persistence_then_retries(tmp_path, monkeypatch, caplog, fail_at):
    clock = FakeClock()
    tier = NVMeTier(tmp_path, retry_after_s=30.0, clock=clock)
    tier.put(key_of(0), make_block(0, shape=SMALL))
    disk_full = True
    calls = 0

    def enospc() -> OSError:
        nonlocal calls
        calls += 1
        return OSError(errno.ENOSPC, "No space left on device")

    class FullFile:
        def __init__(self, f) -> None:
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.f.close()

        def write(self, data) -> int:
            raise enospc()

    real_open, real_fsync = open, os.fsync

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullFile(f) if disk_full and "x" in mode else f

    def fake_fsync(fd: int) -> None:
        if disk_full:
            raise enospc()
        real_fsync(fd)

    if fail_at == "write":
        monkeypatch.setattr(nvme, "open", fake_open, raising=False)
    else:
        monkeypatch.setattr(nvme.os, "fsync", fake_fsync)

    assert tier.put(key_of(1), make_block(1, shape=SMALL)) is False
    assert not tier.persistence_enabled and "No space" in (tier.last_error or "")
    assert tmp_files(tmp_path) == [] and not tier.path_of(key_of(1)).exists()
    assert same_bits(tier.get(key_of(0)), make_block(0, shape=SMALL))  # reads still work

    clock.now += 29.0
    assert tier.put(key_of(2), make_block(2, shape=SMALL)) is False
    assert calls == 1  # refused without touching the disk
    assert [r.message for r in caplog.records if r.levelname == "WARNING"] == [
        "disk full: block persistence disabled"
    ]
    disk_full = False
    clock.now += 2.0
    assert tier.accepting_writes()
    assert tier.put(key_of(1), make_block(1, shape=SMALL))
    assert same_bits(tier.get(key_of(1)), make_block(1, shape=SMALL))
    assert tier.stats()["persistence_enabled"] is True


def test_other_os_errors_raise_and_leave_no_temp_file(tmp_path, monkeypatch):
    tier = NVMeTier(tmp_path)

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(nvme.os, "fsync", eio)
    with pytest.raises(OSError, match="I/O error"):
        tier.put(key_of(1), make_block(1, shape=SMALL))
    assert tmp_files(tmp_path) == [] and tier.persistence_enabled and tier.keys() == []
