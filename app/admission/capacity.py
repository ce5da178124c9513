"""The engines' capacity as admission sees it: a budget of queued prefill tokens (each PE's
measured rate × `prefill_queue_s`), of stored-KV bytes to read (the read side's SNIC rates ×
`read_queue_s`), decode KV tokens and decode batch slots, and how much of each the engines
and SNICs last reported in use."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import inf

from deployments.protocol import LoadReport, ReadCapacity


@dataclass(frozen=True, slots=True)
class Capacity:
    """The engines' budget and their last reported use of it (all tokens but `seqs`)."""

    prefill_tokens: float
    kv_tokens: float
    seqs: int
    used_prefill_tokens: int = 0
    used_kv_tokens: int = 0
    used_seqs: int = 0
    read_bytes: float = float("inf")  # stored KV that may wait to be read (no SNICs: no cap)
    used_read_bytes: int = 0

    @classmethod
    def from_reports(
        cls,
        reports: Sequence[LoadReport],
        prefill_queue_s: float,
        default_rate: float,
        reads: ReadCapacity | None = None,
        read_queue_s: float = 6.0,
    ) -> Capacity | None:
        pes = [r for r in reports if r.role == "prefill"]
        des = [r for r in reports if r.role == "decode"]
        if not pes or not des:
            return None
        return cls(
            prefill_tokens=sum((r.prefill_tokens_per_s or default_rate) for r in pes)
            * prefill_queue_s,
            kv_tokens=sum(r.num_total_blocks * r.block_size for r in des),
            seqs=sum(r.max_num_seqs for r in des),
            used_prefill_tokens=sum(r.num_queued_tokens for r in pes),
            used_kv_tokens=sum(
                (r.num_total_blocks - r.num_free_blocks) * r.block_size for r in des
            ),
            used_seqs=sum(r.num_running + r.num_waiting for r in des),
            read_bytes=reads.bytes_per_s * read_queue_s if reads and reads.bytes_per_s else inf,
            used_read_bytes=reads.queued_bytes if reads else 0,
        )
