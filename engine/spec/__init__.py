"""Speculative decoding: draft-free drafters, exact verification, and when to speculate.

Drafters (`ngram`, `suffix`) propose tokens from text the sequence (or its tenant) has
already seen; the engine scores them in the same forward as the batch's normal decode
tokens and keeps the prefix the target model itself would have produced
(`engine/spec/verify.py`). `engine/spec/policy.py` decides per step how many tokens each
sequence drafts, from the measured cost of a step and the acceptance seen so far.
"""

from __future__ import annotations

from typing import Protocol

from engine.config import SpeculativeConfig


class Drafter(Protocol):
    """Proposes tokens to follow a sequence; learns from finished outputs (per tenant)."""

    def propose(
        self,
        request_id: str,
        tenant: bytes,
        token_ids: list[int],
        num_prompt_tokens: int,
        max_tokens: int,
    ) -> list[int]: ...

    def finish(self, request_id: str, tenant: bytes, output_token_ids: list[int]) -> None: ...


def make_drafter(config: SpeculativeConfig) -> Drafter | None:
    """The configured drafter (None when speculation is off)."""
    if config.method == "off":
        return None
    if config.method == "ngram":
        from engine.spec.ngram import NgramDrafter

        return NgramDrafter(config.prompt_lookup_min, config.prompt_lookup_max)
    from engine.spec.suffix import SuffixDrafter

    return SuffixDrafter(
        max_depth=config.suffix_max_depth,
        max_spec_factor=config.suffix_max_spec_factor,
        max_spec_offset=config.suffix_max_spec_offset,
        min_token_prob=config.suffix_min_token_prob,
        cache_requests=config.suffix_cache_requests,
    )
