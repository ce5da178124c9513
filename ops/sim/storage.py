"""Storage in the simulator: each node's storage NIC, block keys, and a compact KV index.

SimSNIC      one link per node with two FIFO classes and the live StorageNIC's dispatch
             rule (kvstore/snic.py): READs first, yet WRITEs get `min_write_share` of
             the bytes while both queue. Reports the read queue (queued + in flight)
             the Scheduler balances on.
BlockKeys    the chain keys of an agent's first n blocks, made on demand: the keys of
             an agent's prompt are a prefix of its next prompt's, as hash chains are.
CompactIndex the KVIndex contract the policy uses (`longest_prefix`, `apply`) for
             NVMe-tier blocks, stored as one bytearray per agent instead of an entry
             per block; the "exact" index option keeps kvstore.index.KVIndex itself.
BlockWrites  each agent block's WriteState, so that every block is written once.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import overload

from deployments.protocol import ARRIVED_WINDOW_S, NodeReport, RecentIds
from kvstore.index import IndexEntry, IndexEvent
from ops.sim.events import EventLoop

READ, WRITE = 0, 1
_KEY = struct.Struct("<QI")
_ON_NVME = IndexEntry(on_nvme=True)  # every stored block of the compact index (read-only)


def block_key(agent_id: int, block: int) -> bytes:
    return _KEY.pack(agent_id, block)


def _agent_bytes(table: dict[int, bytearray], agent_id: int, num_blocks: int) -> bytearray:
    """An agent's one byte per block in `table`, grown with zeros to at least `num_blocks`."""
    per_block = table.setdefault(agent_id, bytearray())
    if num_blocks > len(per_block):
        per_block.extend(bytes(num_blocks - len(per_block)))
    return per_block


class BlockKeys(Sequence[bytes]):
    """Keys of blocks [first, first + n) of one agent's token chain. A slice is a BlockKeys
    too, so the compact index answers the policy's sliced queries without making keys."""

    __slots__ = ("agent_id", "first", "num_blocks")

    def __init__(self, agent_id: int, num_blocks: int, first: int = 0):
        self.agent_id = agent_id
        self.first = first
        self.num_blocks = num_blocks

    def __len__(self) -> int:
        return self.num_blocks

    @overload
    def __getitem__(self, i: int) -> bytes: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[bytes]: ...
    def __getitem__(self, i: int | slice) -> bytes | Sequence[bytes]:
        if isinstance(i, slice):
            start, stop, step = i.indices(self.num_blocks)
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            return BlockKeys(self.agent_id, max(0, stop - start), self.first + start)
        if not -self.num_blocks <= i < self.num_blocks:
            raise IndexError(i)
        return block_key(self.agent_id, self.first + i % self.num_blocks)

    def __iter__(self) -> Iterator[bytes]:
        first = self.first
        return (block_key(self.agent_id, j) for j in range(first, first + self.num_blocks))


class CompactIndex:
    """Which agent blocks are stored (NVMe tier only: the simulated store has no DRAM)."""

    def __init__(self) -> None:
        self.stored: dict[int, bytearray] = {}
        self.num_blocks = 0

    def __len__(self) -> int:
        return self.num_blocks

    def apply(self, events: Iterable[IndexEvent], now: float = 0.0) -> None:
        for event in events:
            agent_id, block = _KEY.unpack(event.key)
            bits = _agent_bytes(self.stored, agent_id, block + 1)
            was = bits[block]
            bits[block] = 1 if event.present else 0
            self.num_blocks += bits[block] - was

    def mark_stored(self, agent_id: int, num_blocks: int) -> None:
        """Blocks [0, num_blocks) of an agent are stored (a window's earlier context)."""
        bits = _agent_bytes(self.stored, agent_id, num_blocks)
        self.num_blocks += num_blocks - bits.count(1, 0, num_blocks)
        bits[:num_blocks] = b"\1" * num_blocks

    def drop_node(self, node_id: str) -> None:
        """No DRAM tier in the simulator: nothing is lost with a node."""

    def longest_prefix(
        self, keys: Sequence[bytes], now: float | None = None, nodes: set[str] | None = None
    ) -> int:
        if isinstance(keys, BlockKeys):
            bits = self.stored.get(keys.agent_id, bytearray())
            first = keys.first
            end = min(first + len(keys), len(bits))
            if end <= first:
                return 0
            first_missing = bits.find(0, first, end)
            return (end if first_missing < 0 else first_missing) - first
        n = 0
        for key in keys:
            agent_id, block = _KEY.unpack(key)
            bits = self.stored.get(agent_id)
            if bits is None or block >= len(bits) or not bits[block]:
                break
            n += 1
        return n

    def locate(
        self, keys: Sequence[bytes], nodes: set[str] | None = None, now: float | None = None
    ) -> list[IndexEntry]:
        """KVIndex.locate: the entries of the longest stored prefix, all on NVMe here."""
        return [_ON_NVME] * self.longest_prefix(keys, now, nodes)

    def stats(self) -> dict[str, int]:
        return {"blocks": self.num_blocks, "nvme_blocks": self.num_blocks, "dram_blocks": 0}


class WriteState(IntEnum):
    UNSTORED = 0
    PENDING = 1  # its write is queued on (or crossing) a SNIC
    STORED = 2  # written; the index learns of it at the writing node's next report


class BlockWrites:
    """Each agent block's WriteState: a block is written once, by whichever engine first
    holds it, however many turns' KV contain it."""

    def __init__(self) -> None:
        self._states: dict[int, bytearray] = {}

    def mark_stored(self, agent_id: int, num_blocks: int) -> None:
        """Blocks [0, num_blocks) of an agent are stored already (a window's earlier context)."""
        self._states[agent_id] = bytearray([WriteState.STORED]) * num_blocks

    def begin(self, agent_id: int, first: int, end: int) -> list[int]:
        """The blocks in [first, end) neither stored nor being written, now PENDING."""
        states = _agent_bytes(self._states, agent_id, end)
        new = [b for b in range(first, end) if states[b] == WriteState.UNSTORED]
        for b in new:
            states[b] = WriteState.PENDING
        return new

    def complete(self, agent_id: int, blocks: list[int]) -> None:
        """`begin`'s blocks are written."""
        states = self._states[agent_id]
        for b in blocks:
            states[b] = WriteState.STORED


@dataclass(slots=True)
class IOOp:
    kind: int
    nbytes: int
    done: Callable[[], None]


class SimSNIC:
    def __init__(
        self,
        loop: EventLoop,
        node_id: str,
        bytes_per_s: float | None,
        uncapped_bytes_per_s: float,
        min_write_share: float = 0.05,
    ):
        self.loop = loop
        self.node_id = node_id
        self.cap_bytes_per_s = bytes_per_s
        self.rate = bytes_per_s or uncapped_bytes_per_s
        self.min_write_share = min_write_share
        self.queues: tuple[deque[IOOp], deque[IOOp]] = (deque(), deque())
        self.pending_bytes = [0, 0]  # queued + in flight, per class
        self.total_bytes = [0, 0]  # completed, per class
        self.num_ops = [0, 0]
        self.busy_s = 0.0
        self.busy = False
        self.log: list[tuple[float, float, int]] = []  # (start, end, bytes) of every op
        self._period = [0, 0]  # bytes dispatched per class in the current contention period

    @property
    def read_queue_bytes(self) -> int:
        return self.pending_bytes[READ]

    @property
    def write_queue_bytes(self) -> int:
        return self.pending_bytes[WRITE]

    def submit(self, kind: int, nbytes: int, done: Callable[[], None]) -> None:
        """Queue one op; `done()` runs when its bytes have crossed the link."""
        if nbytes <= 0:
            self.loop.after(0.0, done)
            return
        self.queues[kind].append(IOOp(kind, nbytes, done))
        self.pending_bytes[kind] += nbytes
        if not self.busy:
            self._dispatch()

    def _dispatch(self) -> None:
        reads, writes = self.queues
        if not reads and not writes:
            self.busy = False
            return
        if reads and writes:
            w = writes[0].nbytes
            read, written = self._period
            queue = writes if written + w <= self.min_write_share * (read + written + w) else reads
        else:
            self._period = [0, 0]
            queue = reads or writes
        op = queue.popleft()
        self._period[op.kind] += op.nbytes
        self.busy = True
        duration = op.nbytes / self.rate
        self.busy_s += duration
        self.log.append((self.loop.now, self.loop.now + duration, op.nbytes))
        self.loop.after(duration, self._finish, op)

    def _finish(self, op: IOOp) -> None:
        self.pending_bytes[op.kind] -= op.nbytes
        self.total_bytes[op.kind] += op.nbytes
        self.num_ops[op.kind] += 1
        op.done()
        self._dispatch()


@dataclass(slots=True)
class SimNode:
    """A node: its SNIC, the index events of blocks it stored since its last report, and the
    requests whose reads its SNIC took in (the report's `started_ids`)."""

    node_id: str
    role: str
    snic: SimSNIC
    events: list[IndexEvent] = field(default_factory=list)
    dirty: bool = True
    started: RecentIds = field(default_factory=lambda: RecentIds(ARRIVED_WINDOW_S))

    def read(self, request_id: str, nbytes: int, done: Callable[[], None]) -> None:
        """Queue a request's stored-KV read on the SNIC; its next reports name the request."""
        self.snic.submit(READ, nbytes, done)
        self.started.note(request_id, self.snic.loop.now)
        self.dirty = True

    def report(self, now: float, kv_bytes_per_token: int, full_sync: bool) -> NodeReport:
        """What its TrafficManager would send the Scheduler now; takes the pending events."""
        snic = self.snic
        events, self.events, self.dirty = tuple(self.events), [], False
        return NodeReport(
            node_id=self.node_id,
            read_queue_bytes=snic.read_queue_bytes,
            read_queue_tokens=snic.read_queue_bytes // kv_bytes_per_token,
            write_queue_bytes=snic.write_queue_bytes,
            bandwidth_bytes_per_s=snic.cap_bytes_per_s,
            read_throughput_bytes_per_s=snic.rate,
            timestamp_s=now,
            events=events,
            full_sync=full_sync,
            started_ids=self.started.within(now),
        )
