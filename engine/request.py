"""EngineRequest: what a caller hands `EngineCore.add_request` / `add_prefill`."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.kv_import import PrefixKV
from engine.output import SequenceKV
from engine.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One request for an EngineCore. The last three fields belong to one side of a PD
    request each: `kv` and `persist_from_block` to `add_request` (the DE, or one engine),
    `num_de_blocks` to `add_prefill` (the PE).

    Attributes:
        request_id: unique among unfinished requests.
        prompt_token_ids: the full prompt (already templated and tokenised).
        params: sampling parameters (defaults: temperature 1, max_tokens 256).
        tenant_salt: enters every block key, so tenants never share cached KV.
        prefix: stored KV of the prompt's leading full blocks (those blocks are not
            computed).
        priority: lower values are prefilled first (the ingress's service tiers).
        kv: KV already computed elsewhere for a prefix of the prompt (PD handoff); its
            blocks before `kv.num_de_blocks` come from `prefix`. `kv.data` None (transfer
            failed): resume from its tokens, recomputing the KV.
        persist_from_block: hand every full block from this index on to
            `EngineCore.drain_persist()` as it fills (None: never); earlier blocks are
            stored already.
        num_de_blocks: leading prompt blocks the DE already holds: the PE's handoff KV
            starts after them.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    tenant_salt: bytes = b""
    prefix: PrefixKV | None = None
    priority: int = 0
    kv: SequenceKV | None = None
    persist_from_block: int | None = None
    num_de_blocks: int = 0
