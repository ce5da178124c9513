"""Sequence: one request's tokens, KV block table and progress counters."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from engine.kv_import import PrefixKV
from engine.sampling_params import SamplingParams
from engine.structured import GrammarState
from kvstore.keys import chain_key

_MASK64 = (1 << 64) - 1


def draw_seed(seed: int, position: int) -> int:
    """The 64-bit seed of a seeded request's draw at output `position` (splitmix64 of the
    pair): distinct, well-mixed seeds for neighbouring positions and request seeds."""
    z = (seed + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


class SequenceStatus(enum.StrEnum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    """Why a request ended; a str, so outputs compare and serialise as the plain value."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(slots=True, eq=False)
class Sequence:
    """A request as the engine sees it.

    NOTE: `num_computed_tokens` counts tokens whose KV is in the cache. The next step computes
    tokens [num_computed_tokens, num_computed_tokens + n); a step that reaches
    `num_tokens` samples a new token.
    """

    request_id: str
    token_ids: list[int]
    params: SamplingParams
    root_key: bytes
    num_prompt_tokens: int = 0
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first admission)
    num_admissions: int = 0
    block_table: list[int] = field(default_factory=list)
    block_keys: list[bytes] = field(default_factory=list)  # keys of full, computed blocks
    key_chain: list[bytes] = field(default_factory=list)  # keys of full blocks, memoised
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    generator: torch.Generator | None = None  # reused by next_token_generator
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    prefill_only: bool = False  # PD: stop after the first token and hand off KV + state
    num_de_blocks: int = 0  # PD: the receiver holds blocks before this one already
    prefix_kv: PrefixKV | None = None  # stored KV of leading blocks, imported at admission
    pending_import: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    persist_from_block: int | None = None  # export full blocks from here on (None: never)
    priority: int = 0  # lower runs first among waiting requests (FIFO within a priority)
    grammar: GrammarState | None = None  # structured output: where the output is in it
    draft: list[int] = field(default_factory=list)  # speculative tokens to verify next step
    num_drafted_tokens: int = 0  # speculation so far: tokens drafted / accepted
    num_accepted_tokens: int = 0
    num_spec_steps: int = 0  # steps that verified a draft of this sequence
    num_spec_rejections: int = 0  # of those, the ones that ended on a rejected draft token

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)

    def next_token_generator(self) -> torch.Generator | None:
        """The generator a seeded request draws its next token from, seeded by (seed, output
        position) alone: any engine that knows the tokens so far draws exactly what this one
        would (the PD handoff, a DE recomputing after a failed transfer, a request migrated
        off a dead replica). None for an unseeded request (the sampler's shared generator).
        """
        if self.params.seed is None:
            return None
        if self.generator is None:
            self.generator = torch.Generator()
        return self.generator.manual_seed(draw_seed(self.params.seed, self.num_output_tokens))

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_prefilling(self) -> bool:
        """More than the newest token is left to compute: a prompt (or a recompute)."""
        return self.num_tokens - self.num_computed_tokens > 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def full_block_keys(self, block_size: int, num_blocks: int) -> list[bytes]:
        """Chain keys of the first `num_blocks` full blocks, each hashed once per sequence.

        NOTE: valid to memoise because token ids are append-only, so a full block's tokens
        (and every key before it) never change, not even across preemption.
        """
        chain = self.key_chain
        parent = chain[-1] if chain else self.root_key
        for i in range(len(chain), num_blocks):
            parent = chain_key(parent, self.token_ids[i * block_size : (i + 1) * block_size])
            chain.append(parent)
        return chain[:num_blocks]
