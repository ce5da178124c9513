"""Messages between deployments: small frozen dataclasses, pickled through Serve handles.

Request path (one HTTP request):
    Ingress --PlanRequest--> Scheduler --Plan--> Ingress
    Ingress --PrefillJob--> PrefillEngine[plan.prefill_replica] --first token, KVHandoff-->
        Ingress (a stream: the first token goes to the client before the KV is sent)
    Ingress --DecodeJob(handoff)--> DecodeEngine[plan.decode_replica] --RequestOutput*--> Ingress
Load: PrefillEngine / DecodeEngine --LoadReport--> Scheduler and --TransferReport--> the
TrafficManager of their node (periodic, off the request path).

Jobs carry `target_replica` (the replica the Scheduler chose) and node reports carry
`target_node`; `deployments.routing.ReplicaPinnedRouter` honours both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from engine.sampling_params import SamplingParams
from kvstore.transfer.base import KVDescriptor

Role = Literal["prefill", "decode"]


@dataclass(frozen=True, slots=True)
class PlanRequest:
    request_id: str
    num_prompt_tokens: int
    max_tokens: int


@dataclass(frozen=True, slots=True)
class Plan:
    request_id: str
    prefill_replica: str
    decode_replica: str


@dataclass(frozen=True, slots=True)
class PrefillJob:
    request_id: str
    token_ids: list[int]  # the whole prompt
    params: SamplingParams  # the PE samples the first token with them
    tenant_salt: bytes
    target_replica: str | None = None


@dataclass(frozen=True, slots=True)
class KVHandoff:
    """Where the prompt's KV waits for the DE, plus the PE's sampling state.

    The PE streams the first token (a RequestOutput) before this, so the client does not
    wait for the KV send; a request that finished at its first token gets no handoff.
    """

    request_id: str
    token_ids: list[int]
    block_keys: list[bytes]
    output_token_ids: list[int]
    generator_state: Any  # torch ByteTensor of a seeded generator, else None
    descriptor: KVDescriptor
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

    def routing_stats(self) -> dict[str, float]:
        return {
            "queued_tokens": self.num_queued_tokens,
            "running": self.num_running,
            "free_blocks": self.num_free_blocks,
        }


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


@dataclass(frozen=True, slots=True)
class TransferReport:
    target_node: str
    stats: TransferStats
