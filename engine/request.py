"""EngineRequest: what a caller hands `EngineCore.add_request` / `add_prefill`."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.errors import InvalidRequestError
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


def check_request(request: EngineRequest, vocab: int, max_model_len: int, bm: BlockManager) -> None:
    """Refuse what no engine of this shape can serve.

    Raises:
        InvalidRequestError: empty/too-long prompt, unknown token ids, more KV than the
            pool holds, or imported KV that does not belong to this prompt.
    """
    prompt, params, kv = request.prompt_token_ids, request.params, request.kv
    if not prompt:
        raise InvalidRequestError("prompt is empty", param="messages", code="empty_prompt")
    if min(prompt) < 0 or max(prompt) >= vocab:
        raise InvalidRequestError(f"prompt has token ids outside [0, {vocab})", param="prompt")
    if len(prompt) >= max_model_len:
        raise InvalidRequestError(
            f"prompt has {len(prompt)} tokens; this model's context is "
            f"{max_model_len} tokens including the reply",
            param="messages",
            code="context_length_exceeded",
        )
    worst = min(len(prompt) + params.max_tokens, max_model_len)
    if bm.num_blocks_for(worst) > bm.num_blocks:
        raise InvalidRequestError(
            f"prompt + max_tokens ({worst} tokens) exceeds the KV cache "
            f"({bm.num_blocks * bm.block_size} tokens)",
            param="max_tokens",
            code="context_length_exceeded",
        )
    if kv is not None and (
        not 0 < kv.num_tokens <= len(prompt)
        or kv.num_tokens == len(prompt)
        and not kv.output_token_ids
        or prompt[: kv.num_tokens] != kv.token_ids
        or len(kv.output_token_ids) >= params.max_tokens
    ):
        raise InvalidRequestError(
            "imported KV must cover a prefix of the prompt and leave a token to compute"
        )
