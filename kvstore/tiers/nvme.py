"""Tier 2 of the KV store: one file per block in a directory on NVMe (local, or shared).

Layout: `root/<key hex[:2]>/<key hex>.kvb`, one kvstore.block record each, named only from
the key. A block file appears only by `os.replace` of a complete, fsynced temp file: a crash
or `kill -9` leaves no torn block, at worst a `*.tmp` orphan that the next tier removes.
The in-memory LRU index is a cache of the directory, rebuildable from it (`rescan`), which
other processes may share. A block failing any check on read is deleted and is a miss.
A full disk disables persistence (writes return False) until `retry_after_s` has passed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kvstore.block import CorruptBlockError, decode_block, encode_block, read_header
from kvstore.keys import KEY_BYTES
from kvstore.tiers.base import Evicted

logger = logging.getLogger(__name__)

BLOCK_SUFFIX = ".kvb"
TEMP_SUFFIX = ".tmp"
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_HOST = hashlib.blake2b(socket.gethostname().encode(), digest_size=4).hexdigest()
_STATS = ("reads", "read_hits", "read_misses", "read_errors", "corrupt", "writes")
_STATS += ("write_bytes", "write_failures", "evictions")


def temp_file_name(key: bytes, pid: int | None = None) -> str:
    """A writer's temp file name for `key`: `{keyhex}.{host}.{pid}.{uuid8}.tmp`. A pid is
    only checked for liveness on the host (hash of its name) that wrote the file."""
    pid = os.getpid() if pid is None else pid
    return f"{key.hex()}.{_HOST}.{pid}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}"


@dataclass(slots=True)
class BlockMeta:
    key: bytes
    nbytes: int  # file size: header + payload
    shape: tuple[int, ...]
    dtype: str
    mtime: float  # file mtime, wall clock
    last_use: int = 0  # logical access tick of this tier; higher is more recent


def _pid_dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # PermissionError: alive, another user's
        pass
    return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class NVMeTier:
    """A directory of block files with an LRU index, a capacity and disk-full degradation.

    A `kvstore.tiers.base.Tier`: `put(key, block)` -> stored?; `get(key)` -> block or None
    (a miss, never wrong KV); `drain_evicted()` -> what to drop from the owner's global index
    (values None: the files are gone). Thread safe: one lock guards the index and counters,
    and is never held across file I/O.
    """

    def __init__(
        self,
        root: Path | str,
        capacity_bytes: int | None = None,
        fsync: bool = True,
        *,
        retry_after_s: float = 30.0,
        orphan_grace_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Open (creating it if needed) a tier directory: remove orphans, then scan it.

        Args:
            root: the tier's directory.
            capacity_bytes: bound on the bytes of this tier's files (LRU eviction); None: none.
            fsync: fsync each file and its directory before a write returns.
            retry_after_s: after a disk-full error, how long writes are refused.
            orphan_grace_s: age after which any temp file is an orphan, even a live pid's.
            clock: monotonic seconds, for the retry timer (injected by tests).
        """
        self.root = Path(root)
        self.capacity_bytes = capacity_bytes
        self.fsync = fsync
        self.retry_after_s = retry_after_s
        self.orphan_grace_s = orphan_grace_s
        self.persistence_enabled = True
        self.last_error: str | None = None
        self._clock = clock
        self._retry_at = 0.0
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, BlockMeta] = OrderedDict()
        self._usage = 0
        self._reserved = 0  # bytes of writes in flight, counted against the capacity
        self._tick = 0
        self._evicted: list[Evicted[torch.Tensor]] = []
        self._stats = dict.fromkeys(_STATS, 0)
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_orphans()
        self.scan()

    def path_of(self, key: bytes) -> Path:
        """The file of `key` (only the key's hex goes into the name)."""
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            raise ValueError(f"key must be {KEY_BYTES} bytes, got {key!r}")
        h = key.hex()
        return self.root / h[:2] / f"{h}{BLOCK_SUFFIX}"

    def get(self, key: bytes) -> torch.Tensor | None:
        """The stored block of `key`, or None (absent, unreadable, or corrupt and removed).

        Args:
            key: the block's key; the file may have been written by another process.
        """
        block, _ = self._load(key)
        with self._lock:
            self._stats["reads"] += 1
            self._stats["read_hits" if block is not None else "read_misses"] += 1
            if block is not None and key in self._index:
                self._touch(key)
        return block

    def _load(self, key: bytes) -> tuple[torch.Tensor | None, bool]:
        """(block or None, whether it was corrupt and removed); no counters, no LRU touch."""
        path = self.path_of(key)
        with self._lock:
            known = self._index.get(key)
        try:
            with open(path, "rb") as f:  # buffered readinto fills the buffer unless at EOF
                buf = bytearray(os.fstat(f.fileno()).st_size)
                del buf[f.readinto(buf) :]
        except FileNotFoundError:
            with self._lock:
                # NOTE: identity check: a write that committed meanwhile keeps its entry.
                if known is not None and self._index.get(key) is known:
                    self._forget(key)
            return None, False
        except OSError as e:
            logger.warning("block read failed", extra={"key": key.hex(), "error": str(e)})
            with self._lock:
                self._stats["read_errors"] += 1
            return None, False
        try:
            return decode_block(buf, expect_key=key), False
        except CorruptBlockError as e:
            self._remove_corrupt(path, key, str(e))
            return None, True

    def contains(self, key: bytes) -> bool:
        """Whether the index holds `key` (no I/O)."""
        with self._lock:
            return key in self._index

    def keys(self) -> list[bytes]:
        """Indexed keys, least recently used first."""
        with self._lock:
            return list(self._index)

    @property
    def usage_bytes(self) -> int:
        with self._lock:
            return self._usage

    def stats(self) -> dict[str, int | float | bool]:
        with self._lock:
            more = {"num_blocks": len(self._index), "bytes": self._usage}
            return {**self._stats, **more, "persistence_enabled": self.persistence_enabled}

    def put(self, key: bytes, block: torch.Tensor) -> bool:
        """Store `block` under `key` atomically. True when stored or already present (not
        rewritten); False while persistence is disabled (disk full) or if the block alone
        exceeds the capacity. Never raises on a full disk.

        Args:
            key: the block's key.
            block: a Full Block tensor (float32, float16 or bfloat16).
        """
        path = self.path_of(key)
        if not self.accepting_writes():
            return False
        with self._lock:
            if key in self._index:
                self._touch(key)
                return True
        if path.exists():  # written by another process sharing the directory: nothing to do
            return True
        header, payload = encode_block(key, block)
        nbytes = len(header) + len(payload)
        victims = self._reserve(nbytes)
        if victims is None:
            return False
        for victim in victims:
            with contextlib.suppress(OSError):
                self.path_of(victim).unlink(missing_ok=True)
        try:
            # NOTE: a file already there came from another process sharing the directory.
            if not path.exists():
                self._write_file(path, header, payload)
        except OSError as e:
            with self._lock:
                self._reserved -= nbytes
                self._stats["write_failures"] += 1
            if e.errno not in _DISK_FULL:
                raise
            with self._lock:
                was_enabled, self.persistence_enabled = self.persistence_enabled, False
                self._retry_at = self._clock() + self.retry_after_s
                self.last_error = str(e)
            if was_enabled:  # NOTE: once per outage, however many writes were in flight
                extra = {"root": str(self.root), "error": str(e), "retry_s": self.retry_after_s}
                logger.warning("disk full: block persistence disabled", extra=extra)
            return False
        dtype = str(block.dtype).removeprefix("torch.")
        with self._lock:
            self._reserved -= nbytes
            if key not in self._index:
                self._index[key] = BlockMeta(key, nbytes, tuple(block.shape), dtype, time.time())
                self._usage += nbytes
            self._touch(key)
            self._stats["writes"] += 1
            self._stats["write_bytes"] += nbytes
        return True

    def _write_file(self, path: Path, header: bytes, payload: memoryview | bytes) -> None:
        tmp = path.parent / temp_file_name(bytes.fromhex(path.stem))
        try:
            if not path.parent.is_dir():
                path.parent.mkdir(exist_ok=True)
                if self.fsync:
                    _fsync_dir(self.root)
            with open(tmp, "xb") as f:  # NOTE: a buffered write() writes everything or raises
                f.write(header)
                f.write(payload)
                f.flush()
                if self.fsync:
                    os.fsync(f.fileno())
            # NOTE: the only way a block file appears: readers never see a partial block.
            os.replace(tmp, path)
            if self.fsync:
                _fsync_dir(path.parent)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise

    def _reserve(self, nbytes: int) -> list[bytes] | None:
        """Count `nbytes` against the capacity, evicting LRU blocks from the index to fit;
        returns the victims (files still to delete) or None if the block alone is too big."""
        with self._lock:
            cap, victims = self.capacity_bytes, []
            if cap is not None:
                if nbytes > cap:
                    return None
                while self._index and self._usage + self._reserved + nbytes > cap:
                    victim, meta = self._index.popitem(last=False)
                    self._usage -= meta.nbytes
                    victims.append(victim)
                    self._evicted.append(Evicted(victim, None, meta.nbytes))
                self._stats["evictions"] += len(victims)
            self._reserved += nbytes
            return victims

    def accepting_writes(self) -> bool:
        """False while persistence is disabled (disk full) and its retry time has not come."""
        with self._lock:
            if not self.persistence_enabled and self._clock() >= self._retry_at:
                self.persistence_enabled = True
                logger.info("retrying block persistence", extra={"root": str(self.root)})
            return self.persistence_enabled

    def delete(self, key: bytes) -> bool:
        """Remove `key`'s file and index entry; True if either existed.

        Args:
            key: the block's key.
        """
        path = self.path_of(key)
        with self._lock:
            known = self._forget(key) is not None
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            return True
        return known

    def drain_evicted(self) -> list[Evicted[torch.Tensor]]:
        """Blocks evicted for capacity since the last call (for the owner's global index)."""
        with self._lock:
            out, self._evicted = self._evicted, []
            return out

    def scan(self) -> int:
        """Rebuild the index from the directory's headers (removing files with a bad header,
        name or size); returns its size. Known blocks keep their LRU order; new ones enter as
        least recently used, oldest file first."""
        start_tick = self._tick  # NOTE: an int read needs no lock
        found = {m.key: m for p in self.root.glob(f"??/*{BLOCK_SUFFIX}") if (m := self._meta(p))}
        with self._lock:
            old = self._index
            # NOTE: entries written or read while we scanned stay even if the glob missed them.
            found |= {k: m for k, m in old.items() if m.last_use > start_tick and k not in found}
            new = sorted((m for k, m in found.items() if k not in old), key=lambda m: m.mtime)
            order = new + [found[k] for k in old if k in found]
            for m in order:
                self._tick += 1
                m.last_use = self._tick
            self._index = OrderedDict((m.key, m) for m in order)
            self._usage = sum(m.nbytes for m in order)
            return len(order)

    rescan = scan

    def verify_all(self) -> tuple[int, list[bytes]]:
        """Read every indexed block; returns (number valid, keys found corrupt and removed)."""
        ok, corrupt = 0, []
        for key in self.keys():
            block, bad = self._load(key)
            ok += block is not None
            corrupt += [key] if bad else []
        return ok, corrupt

    def _meta(self, path: Path) -> BlockMeta | None:
        try:
            with open(path, "rb") as f:
                header, size = read_header(f)
                st = os.fstat(f.fileno())
        except CorruptBlockError as e:
            self._remove_corrupt(path, None, str(e))
            return None
        except OSError:
            return None  # gone (another process evicted it) or unreadable: not indexed
        if (path.stem, st.st_size) != (header.key.hex(), size + header.payload_bytes):
            self._remove_corrupt(path, None, f"holds key {header.key.hex()}, {st.st_size} bytes")
            return None
        return BlockMeta(header.key, st.st_size, header.shape, header.dtype, st.st_mtime)

    def _remove_orphans(self) -> None:
        """Delete temp files of dead writers on this host, and any older than the grace."""
        now, removed = time.time(), 0
        for tmp in self.root.rglob(f"*{TEMP_SUFFIX}"):
            parts = tmp.name.split(".")
            ours = len(parts) == 5 and parts[1] == _HOST and parts[2].isdigit()
            dead = ours and _pid_dead(int(parts[2]))
            try:
                if dead or now - tmp.stat().st_mtime > self.orphan_grace_s:
                    tmp.unlink()
                    removed += 1
            except FileNotFoundError:
                continue  # its writer renamed it, or another process removed it
        if removed:
            logger.info("removed orphan temp files", extra={"root": str(self.root), "n": removed})

    def _remove_corrupt(self, path: Path, key: bytes | None, reason: str) -> None:
        logger.warning("corrupt block removed", extra={"path": str(path), "reason": reason})
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)
        with self._lock:
            self._stats["corrupt"] += 1
            if key is not None:
                self._forget(key)

    def _touch(self, key: bytes) -> None:  # the caller holds the lock (and _forget's)
        self._tick += 1
        self._index[key].last_use = self._tick
        self._index.move_to_end(key)

    def _forget(self, key: bytes) -> BlockMeta | None:
        meta = self._index.pop(key, None)
        if meta is not None:
            self._usage -= meta.nbytes
        return meta
