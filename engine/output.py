"""Per-request output processing: detokenise, apply stop strings, hold back partial stops."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason, TokenLogprob
from engine.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass(slots=True)
class SequenceKV:
    """A sequence's computed KV as Full Blocks, ready to move to another engine or a tier.

    `data` is `[num_blocks - num_de_blocks, layers, 2, block_size, kv_heads, head_dim]`: blocks
    `[num_de_blocks, ...)` of the sequence (the receiver already holds the ones before); the
    last block may be partial (only the first `num_tokens % block_size` slots count).
    `data=None` resumes without the KV (its transfer failed): the receiver recomputes it.
    """

    token_ids: list[int]
    block_keys: list[bytes]  # keys of all full blocks, in order (from block 0)
    data: torch.Tensor | None
    # PD resume state: tokens already sampled (their KV not in `data`); a seeded draw is a
    # function of (seed, position), so the receiver samples exactly as one engine.
    output_token_ids: list[int] = field(default_factory=list)
    num_de_blocks: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(slots=True)
class FirstTokenTimings:
    """Where a request's time went before its first token, in seconds (the first output
    carries it): the PE's own time, and the request path's steps before the PE."""

    engine_s: float | None = None  # PE: from admission to the first output (no hops)
    schedule_s: float | None = None  # the Scheduler's plan
    kv_read_s: float | None = None  # stored-KV reads on both sides


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request (deltas), plus running totals."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    text: str = ""  # all text emitted so far, including new_text
    kv: SequenceKV | None = None  # prefill-only request handed off: its last output
    timings: FirstTokenTimings | None = None  # on the first output only
    # speculation for this request on this engine so far (running totals)
    num_drafted_tokens: int = 0
    num_accepted_tokens: int = 0
    num_spec_steps: int = 0  # steps that verified a draft (mean accepted length: 1 + a/s)


class OutputState:
    """Tracks emitted text for one request.

    NOTE: while unfinished, the last `max(len(stop)) - 1` characters are held back, so a
    client never receives the beginning of a stop string that is then cut.
    """

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams):
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stop = params.stop
        self.include_stop = params.include_stop_str_in_output
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.emitted = 0
        self.final_text: str | None = None

    def update(
        self, token_ids: list[int], finishing: bool, check_stop: bool = True
    ) -> tuple[str, bool]:
        """Feed new tokens; return (text delta to emit, whether a stop string was hit).

        `check_stop=False` (before min_tokens) ignores stop strings but keeps the holdback.
        """
        before = len(self.detok.text)
        self.detok.add(token_ids)
        text = self.detok.text
        stop_hit = False
        if self.stop and check_stop:
            search_from = max(0, before - self.holdback)
            hits = [(i, s) for s in self.stop if (i := text.find(s, search_from)) >= 0]
            if hits:
                idx, s = min(hits)
                text = text[: idx + len(s)] if self.include_stop else text[:idx]
                stop_hit = True
        end = len(text) if (finishing or stop_hit) else max(self.emitted, len(text) - self.holdback)
        delta = text[self.emitted : end]
        self.emitted = end
        if finishing or stop_hit:
            self.final_text = text
        return delta, stop_hit

    @property
    def text(self) -> str:
        return self.final_text if self.final_text is not None else self.detok.text[: self.emitted]
