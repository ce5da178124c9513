"""Messages between deployments: small frozen dataclasses, pickled through Serve handles.

Request path (one HTTP request):
    Ingress --PlanRequest(block keys)--> Scheduler --Plan(PE, DE, read split)--> Ingress
    Ingress --load(keys)--> TrafficManager of the DE node and/or the PE node (SNIC reads)
        --DRAM handles--> Ingress
    Ingress --PrefillJob(hit handles)--> PrefillEngine[plan.prefill_replica] --first token,
        KVHandoff--> Ingress (a stream: the first token goes to the client before the KV)
    Ingress --DecodeJob(handoff, DE-side handles)--> DecodeEngine[plan.decode_replica]
        --RequestOutput*--> Ingress; the DE persists new full blocks through its node's TM.
Load: PrefillEngine / DecodeEngine --LoadReport--> Scheduler and --TransferStats--> the
TrafficManager of their node; TrafficManager --NodeReport(SNIC queues, index events)-->
Scheduler (periodic, off the request path).

Every request-path message carries `trace`, the W3C context of the caller's span, so one
request is one trace across the deployments (`deployments/tracing.py`).
PrefillJob and DecodeJob carry `target_replica` (the replica the Scheduler chose);
`deployments.routing.ReplicaPinnedRouter` sends them there. Node-level calls need no
routing: each logical node's TrafficManager is its own deployment.
"""

from __future__ import annotations

import enum
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from kvstore.index import IndexEvent

if TYPE_CHECKING:  # NOTE: torch-free at run time, so the policy and simulator import fast
    from engine.sampling_params import SamplingParams
    from kvstore.transfer.base import KVDescriptor

Role = Literal["prefill", "decode"]
# how long an engine (node) keeps naming a request it took in (whose reads it started) in
# its reports: long enough that a report or two lost on the way does not matter
ARRIVED_WINDOW_S = 10.0


class RecentIds:
    """Request ids with the time each was first noted; `within(now)` names those of the last
    `window_s` seconds, oldest first, and forgets the older ones. What an engine reports as
    `arrived_ids` and a node as `started_ids`; safe to share between threads."""

    def __init__(self, window_s: float = ARRIVED_WINDOW_S):
        self.window_s = window_s
        self._noted: deque[tuple[float, str]] = deque()  # in time order
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def note(self, request_id: str, now: float) -> None:
        with self._lock:
            if request_id not in self._ids:
                self._ids.add(request_id)
                self._noted.append((now, request_id))

    def within(self, now: float) -> tuple[str, ...]:
        with self._lock:
            noted = self._noted
            while noted and noted[0][0] < now - self.window_s:
                self._ids.discard(noted.popleft()[1])
            return tuple(request_id for _, request_id in noted)


class ReadPath(enum.StrEnum):
    """Which side reads a request's stored KV through its node's SNIC."""

    NONE = "none"  # nothing stored: the PE computes the whole prompt
    PE = "pe"  # the PE's node reads every hit block
    DE = "de"  # the DE's node reads them, and forwards them to the PE
    SPLIT = "split"  # the DE's node reads the first `num_de_blocks`, the PE's node the rest


@dataclass(frozen=True, slots=True)
class PlanRequest:
    request_id: str
    num_prompt_tokens: int
    max_tokens: int
    block_keys: tuple[bytes, ...] = ()  # chain keys of the prompt's full blocks
    trace: dict[str, str] = field(default_factory=dict)  # W3C trace context (tracing.py)


@dataclass(frozen=True, slots=True)
class StoredPrefix:
    """How much of a prompt the KV store holds (cluster index, any node): what admission
    charges to the storage reads instead of the prefill compute."""

    num_blocks: int = 0  # leading blocks stored
    num_snic_blocks: int = 0  # of them, those in no node's DRAM: read through an SNIC
    block_bytes: int = 0


@dataclass(frozen=True, slots=True)
class ReadCapacity:
    """The storage side's read rate as admission sees it, and what is queued on it."""

    bytes_per_s: float  # summed over the nodes the policy reads on
    queued_bytes: int  # reads queued and in flight on those nodes' SNICs, and planned


@dataclass(frozen=True, slots=True)
class Plan:
    """Who serves a request, and who reads its stored KV.

    Hit blocks are `[0, num_hit_blocks)` of the prompt. The decode side reads the first
    `num_de_blocks` of them through its node's SNIC, the prefill side reads the rest, so the
    PE always ends up with all hit KV and the DE already holds `[0, num_de_blocks)`:
    ReadPath.PE has num_de_blocks = 0, ReadPath.DE has num_de_blocks = num_hit_blocks.
    """

    request_id: str
    prefill_replica: str
    decode_replica: str
    prefill_node: str = ""
    decode_node: str = ""
    read_path: ReadPath = ReadPath.NONE
    num_hit_blocks: int = 0
    num_de_blocks: int = 0
    # runs [start, end) of hit blocks that the side reading them pulls from another node's
    # DRAM (that node's object store) instead of reading them through its own SNIC
    pulls: tuple[tuple[int, int, str], ...] = ()

    @property
    def pe_read_blocks(self) -> int:
        return self.num_hit_blocks - self.num_de_blocks


@dataclass(frozen=True, slots=True)
class PrefillJob:
    request_id: str
    prompt_token_ids: list[int]  # the whole prompt
    params: SamplingParams  # the PE samples the first token with them
    tenant_salt: bytes
    target_replica: str | None = None
    prefix_blocks: tuple[Any, ...] = ()  # DRAM handles of the hit blocks [0, n), in order
    prefix_keys: tuple[bytes, ...] = ()  # their keys (checked against the prompt's chain)
    num_de_blocks: int = 0  # leading blocks the DE holds already: not sent back
    priority: int = 0  # the PE prefills lower values first (service tier rank)
    trace: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class KVHandoff:
    """Where the prompt's KV waits for the DE, plus the tokens the PE sampled.

    The PE streams the first token (a RequestOutput) before this, so the client does not
    wait for the KV send; a request that finished at its first token gets no handoff.
    """

    request_id: str
    token_ids: list[int]
    block_keys: list[bytes]
    output_token_ids: list[int]
    descriptor: KVDescriptor
    num_de_blocks: int  # the descriptor's data starts at this block of the prompt
    prefill_s: float  # engine time from admission to the first token
    send_s: float  # time to hand the layers to the transport


@dataclass(frozen=True, slots=True)
class DecodeJob:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    tenant_salt: bytes
    handoff: KVHandoff | None
    target_replica: str | None = None
    prefix_blocks: tuple[Any, ...] = ()  # DRAM handles of blocks [0, handoff.num_de_blocks)
    num_stored_blocks: int = 0  # leading blocks already in the KV store: not persisted again
    # no handoff (the PE or a DE was lost): output tokens the client already has; the DE
    # recomputes the KV of prompt + these and continues after them
    emitted: tuple[int, ...] = ()
    trace: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What an engine replica tells the Scheduler (and Serve's router, via routing stats)."""

    replica_id: str
    role: Role
    node_id: str
    num_queued_tokens: int  # prompt tokens admitted or waiting but not computed yet
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    block_size: int
    max_num_seqs: int
    timestamp_s: float
    num_context_tokens: int = 0  # tokens held by unfinished requests (their KV)
    kv_bytes_per_token: int = 0
    prefill_tokens_per_s: float = 0.0  # measured compute rate, 0 until measured
    # requests this engine took in during the last `ARRIVED_WINDOW_S`: each is counted in
    # the figures above (or finished already), so the Scheduler retires what it planned
    # for them (deployments/scheduler/view.py)
    arrived_ids: tuple[str, ...] = ()
    ray_node_id: str = ""  # the Ray node the replica runs on ("" outside Ray)

    def routing_stats(self) -> dict[str, float]:
        return {
            "queued_tokens": self.num_queued_tokens,
            "running": self.num_running,
            "free_blocks": self.num_free_blocks,
        }


@dataclass(frozen=True, slots=True)
class NodeReport:
    """What a node's TrafficManager tells the Scheduler: its SNIC queues and index changes."""

    node_id: str
    read_queue_bytes: int
    read_queue_tokens: int
    write_queue_bytes: int
    bandwidth_bytes_per_s: float | None  # the SNIC cap; None = uncapped
    read_throughput_bytes_per_s: float
    timestamp_s: float
    events: tuple[IndexEvent, ...] = ()
    full_sync: bool = False  # events are the node's whole content, not a delta
    # requests whose stored-KV loads this node took in during the last `ARRIVED_WINDOW_S`:
    # their reads are in `read_queue_bytes` (queued or in flight) or done
    started_ids: tuple[str, ...] = ()
    ray_node_id: str = ""  # the Ray node the TrafficManager (and its DRAM tier) lives on


@dataclass(slots=True)
class TransferStats:
    """Cumulative transfer counters of one engine replica."""

    replica_id: str
    node_id: str
    role: str
    num_sent: int = 0
    num_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    send_s: float = 0.0
    receive_s: float = 0.0
    num_fallbacks: int = 0
    bytes_by_transport: dict[str, int] = field(default_factory=dict)

    def add(self, descriptor: KVDescriptor, seconds: float, sent: bool) -> None:
        n = descriptor.num_bytes
        if sent:
            self.num_sent += 1
            self.bytes_sent += n
            self.send_s += seconds
        else:
            self.num_received += 1
            self.bytes_received += n
            self.receive_s += seconds
        by = self.bytes_by_transport
        by[descriptor.transport] = by.get(descriptor.transport, 0) + n
