"""`python -m ops kv stats | ls | verify`: inspect the NVMe tier directory offline (no Ray, no
running app needed; safe beside one).

Read-only, except `verify --delete`. It never opens an `NVMeTier`: its constructor deletes
orphan temp files and its scan deletes blocks with a bad header, name or size, without
reporting them. It reuses the tier's file layout and the block format's own checks
(`read_header`, `decode_block`) instead. Exit codes: 0 ok, 1 bad blocks found (verify),
2 no such directory.
"""

from __future__ import annotations

import argparse
import inspect
import os
import shutil
import stat
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from deployments.options import default_kvstore_dir
from kvstore.block import (
    HEADER_PREFIX_BYTES,
    BlockHeader,
    CorruptBlockError,
    decode_block,
    decode_header,
    header_size,
    read_header,
)
from kvstore.keys import KEY_BYTES
from kvstore.tiers.nvme import _HOST, BLOCK_SUFFIX, TEMP_SUFFIX, NVMeTier, _pid_dead

ORPHAN_GRACE_S = inspect.signature(NVMeTier).parameters["orphan_grace_s"].default
WIDTH = 160  # tables when stdout is not a terminal (pipes, tests): no wrapping
STATUSES = ("ok", "corrupt", "truncated", "unreadable")


@dataclass(slots=True)
class Entry:
    """One block file as its header describes it; header None: unreadable, or a file the
    tier's scan would delete (bad header, or a name or size its header disagrees with)."""

    path: Path
    size: int
    mtime: float
    header: BlockHeader | None


def _root(args: argparse.Namespace) -> Path:
    return Path(args.path).expanduser() if args.path else default_kvstore_dir()


def _console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=WIDTH)


def _line(console: Console, text: str) -> None:
    """Plain text on one line, never wrapped (paths: easy to grep and copy)."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _missing(root: Path) -> bool:
    if root.is_dir():
        return False
    print(f"no such directory: {root}", file=sys.stderr)
    return True


def block_files(root: Path) -> list[Path]:
    """The block files of a tier directory (the glob `NVMeTier.scan` indexes)."""
    return sorted(root.glob(f"??/*{BLOCK_SUFFIX}"))


def fmt_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


def fmt_time(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t is not None else "-"


def fmt_shape(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape))


def _is_orphan(tmp: Path, mtime: float, now: float) -> bool:
    """The rule `NVMeTier` removes temp files by: a dead writer on this host, or too old."""
    parts = tmp.name.split(".")
    ours = len(parts) == 5 and parts[1] == _HOST and parts[2].isdigit()
    return (ours and _pid_dead(int(parts[2]))) or now - mtime > ORPHAN_GRACE_S


def read_entry(path: Path) -> Entry | None:
    """The header of a block file (not its payload); None if the file vanished meanwhile."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            try:
                header, size = read_header(f)
            except CorruptBlockError:
                return Entry(path, st.st_size, st.st_mtime, None)
    except FileNotFoundError:
        return None  # evicted by a running tier
    except OSError:
        return Entry(path, 0, 0.0, None)
    if (path.stem, st.st_size) != (header.key.hex(), size + header.payload_bytes):
        return Entry(path, st.st_size, st.st_mtime, None)
    return Entry(path, st.st_size, st.st_mtime, header)


def read_entries(root: Path) -> tuple[list[Entry], list[Entry]]:
    """The entry of every block file under `root` (bar vanished ones), and the valid ones."""
    entries = [e for p in block_files(root) if (e := read_entry(p)) is not None]
    return entries, [e for e in entries if e.header is not None]


def check_file(path: Path) -> tuple[str, str, os.stat_result | None]:
    """(status, reason, stat) of one block file, reading it whole: `decode_block` checks the
    header and payload checksums and that the file holds the key its name says. Status is
    one of STATUSES, or "gone" (deleted meanwhile, as a running tier's eviction does)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            buf = bytearray(st.st_size)
            del buf[f.readinto(buf) :]
    except FileNotFoundError:
        return "gone", "", None
    except OSError as e:
        return "unreadable", str(e), None
    try:
        key = bytes.fromhex(path.stem)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES or path.parent.name != path.stem[:2]:
        return "corrupt", "file name is not <hh>/<32 hex key>.kvb", st
    try:
        if len(buf) < HEADER_PREFIX_BYTES or len(buf) < header_size(buf):
            return "truncated", f"header cut at {len(buf)} bytes", st
        header, size = decode_header(buf)
        if len(buf) < size + header.payload_bytes:
            return "truncated", f"{len(buf)} of {size + header.payload_bytes} bytes", st
        decode_block(buf, expect_key=key)
    except CorruptBlockError as e:
        return "corrupt", str(e), st
    return "ok", "", st


def cmd_stats(args: argparse.Namespace) -> int:
    """Blocks, bytes, dtypes and shapes, mtimes, temp files, free space; exit code 0 or 2."""
    root = _root(args)
    if _missing(root):
        return 2
    entries, good = read_entries(root)
    groups: Counter[tuple[str, tuple[int, ...]]] = Counter()
    group_bytes: Counter[tuple[str, tuple[int, ...]]] = Counter()
    for e in good:
        assert e.header is not None
        groups[(e.header.dtype, e.header.shape)] += 1
        group_bytes[(e.header.dtype, e.header.shape)] += e.size
    now, temps, orphans, temp_bytes, other = time.time(), 0, 0, 0, 0
    blocks = {e.path for e in entries}
    for p in root.rglob("*"):
        try:
            st = p.stat()
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode) or p in blocks:
            continue
        if p.name.endswith(TEMP_SUFFIX):
            temps, temp_bytes = temps + 1, temp_bytes + st.st_size
            orphans += _is_orphan(p, st.st_mtime, now)
        else:
            other += 1
    mtimes = [e.mtime for e in good]
    disk = shutil.disk_usage(root)
    summary = Table(show_header=False)
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    for name, value in (
        ("blocks", str(len(good))),
        ("block bytes", fmt_bytes(sum(e.size for e in good))),
        ("bad header, name or size (run `kv verify`)", str(len(entries) - len(good))),
        ("oldest block", fmt_time(min(mtimes, default=None))),
        ("newest block", fmt_time(max(mtimes, default=None))),
        ("temp files", f"{temps} ({fmt_bytes(temp_bytes)})"),
        (f"  orphans (dead writer or > {ORPHAN_GRACE_S:g} s)", str(orphans)),
        ("other files", str(other)),
        ("filesystem free", f"{fmt_bytes(disk.free)} of {fmt_bytes(disk.total)}"),
    ):
        summary.add_row(name, value)
    shapes = Table(title="blocks by dtype and shape")
    for col in ("dtype", "layers × heads × dims", "tokens/block", "shape", "blocks", "bytes"):
        shapes.add_column(col, justify="left" if col in ("dtype", "shape") else "right")
    for (dtype, shape), n in sorted(groups.items(), key=lambda kv: -kv[1]):
        five = len(shape) == 5  # [layers, 2, block_size, kv_heads, head_dim]
        lhd = f"{shape[0]} × {shape[3]} × {shape[4]}" if five else "-"
        tokens = str(shape[2]) if five else "-"
        size = fmt_bytes(group_bytes[(dtype, shape)])
        shapes.add_row(dtype, lhd, tokens, fmt_shape(shape), str(n), size)
    console = _console()
    _line(console, f"NVMe KV tier {root}")
    console.print(summary)
    console.print(shapes)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    """One row per block, newest (or largest) first, `args.limit` rows; exit code 0 or 2."""
    root = _root(args)
    if _missing(root):
        return 2
    entries, good = read_entries(root)
    good.sort(key=(lambda e: e.mtime) if args.sort == "mtime" else (lambda e: e.size))
    good.reverse()  # newest / largest first
    shown = good[: args.limit] if args.limit > 0 else good
    table = Table()
    for col in ("key", "size", "dtype", "shape", "mtime"):
        table.add_column(col, justify="right" if col == "size" else "left")
    for e in shown:
        assert e.header is not None
        key = e.header.key.hex()
        shape = fmt_shape(e.header.shape)
        table.add_row(f"{key[:12]}…", fmt_bytes(e.size), e.header.dtype, shape, fmt_time(e.mtime))
    if len(entries) > len(good):
        table.caption = f"{len(entries) - len(good)} bad files not shown: run `kv verify`"
    console = _console()
    heading = f"{root}: {len(shown)} of {len(good)} blocks, by {args.sort}"
    _line(console, heading)
    console.print(table)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Check every block file whole; exit code 0 if all are ok, 1 if any is not, 2 if no
    directory. With `args.delete`, remove the corrupt and truncated ones (an unreadable file
    may be a transient I/O error, or another user's: it is left)."""
    root = _root(args)
    if _missing(root):
        return 2
    paths = block_files(root)
    sizes: dict[Path, int] = {}
    for p in paths:
        try:
            sizes[p] = p.stat().st_size
        except OSError:
            sizes[p] = 0
    counts = Counter(dict.fromkeys(STATUSES, 0))
    bad: list[tuple[Path, str, str, os.stat_result | None]] = []
    err = Console(stderr=True)
    columns = (TextColumn("verify"), BarColumn(), DownloadColumn(binary_units=True))
    columns += (TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("verify", total=sum(sizes.values()))
        for p in paths:
            status, reason, st = check_file(p)
            counts[status] += 1
            if status not in ("ok", "gone"):
                bad.append((p, status, reason, st))
            bar.advance(task, sizes[p])
    deleted = 0
    if args.delete:
        for p, _, _, st in bad:
            if st is None:  # unreadable: an I/O or permission error, maybe transient
                continue
            try:
                cur = p.stat()
                # NOTE: only the file we checked, not one a running tier wrote since
                if (cur.st_ino, cur.st_mtime_ns) == (st.st_ino, st.st_mtime_ns):
                    p.unlink()
                    deleted += 1
            except FileNotFoundError:
                continue
    console = _console()
    summary = Table()
    for col in (*STATUSES, "gone", "deleted"):
        summary.add_column(col, justify="right")
    summary.add_row(*(str(counts[s]) for s in (*STATUSES, "gone")), str(deleted))
    _line(console, f"verify {root}")
    console.print(summary)
    for p, status, reason, _ in bad:
        _line(console, f"{status:<10} {p}  {reason}")
    return 1 if bad else 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `kv stats | ls | verify` to the `dps` sub-commands (each sets `func`)."""
    kv = sub.add_parser("kv", help="inspect and check the NVMe KV tier directory (offline)")
    kv_sub = kv.add_subparsers(dest="kv_cmd", required=True)
    where = argparse.ArgumentParser(add_help=False)
    default = "$DUALPATH_KV_DIR, else ~/.cache/dualpath-serve/kvstore"
    where.add_argument("--path", default=None, help=f"tier directory (default: {default})")
    stats = kv_sub.add_parser("stats", parents=[where], help="blocks, bytes, shapes, free space")
    stats.set_defaults(func=cmd_stats)
    ls = kv_sub.add_parser("ls", parents=[where], help="one row per block")
    ls.add_argument("--limit", type=int, default=50, help="rows to show (0: all)")
    ls.add_argument("--sort", choices=["mtime", "size"], default="mtime", help="descending")
    ls.set_defaults(func=cmd_ls)
    verify = kv_sub.add_parser(
        "verify", parents=[where], help="read every block, check its checksums; exit 1 if bad"
    )
    verify.add_argument("--delete", action="store_true", help="remove corrupt, truncated files")
    verify.set_defaults(func=cmd_verify)
