"""Verify drafts against the target model's own samples, position by position."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from engine.output import RequestOutput
from engine.sampler import Sampler
from engine.sequence import Sequence, TokenLogprob

AcceptFn = Callable[[Sequence, int, TokenLogprob | None], RequestOutput]


def verify(
    seqs: list[Sequence],
    logits: torch.Tensor,
    drafts: list[list[int]],
    sampler: Sampler,
    accept: AcceptFn,
) -> tuple[list[RequestOutput], list[int]]:
    """Sample each sequence's next token and keep its draft as far as the samples agree.

    `logits` holds `1 + len(draft)` rows per sequence, in order. Round r samples row r of
    every sequence still agreeing, exactly as a step without speculation would sample that
    position (penalties, grammar and min_tokens see the tokens accepted so far; a seeded
    draw is keyed by its output position), hands the token to `accept` (append, stop
    checks, detokenise), and keeps going only if it equals the draft's token r. So the
    output is the one a run without speculation produces: token for token under greedy
    and seeded sampling (given the same logits), and in distribution otherwise. For a
    drafter that proposes `x` deterministically this *is* speculative sampling's rule: `x`
    is accepted with probability p(x), and a rejection leaves a sample from p with `x`
    removed and renormalised.

    Each accepted draft token's KV was computed in this step, so it counts as computed
    (`num_computed_tokens`); the rest of the draft's KV is garbage beyond the computed
    length, overwritten when those positions are computed for real.

    Returns one (merged) output per sequence and the number of draft tokens accepted.
    """
    first_row = list(itertools.accumulate((1 + len(d) for d in drafts), initial=0))
    outputs: list[RequestOutput | None] = [None] * len(seqs)
    accepted = [0] * len(seqs)
    active = list(range(len(seqs)))
    depth = 0
    while active:
        rows = logits[[first_row[i] + depth for i in active]]
        result = sampler(rows, [seqs[i] for i in active])
        still: list[int] = []
        for i, token_id, logprob in zip(active, result.token_ids, result.logprobs, strict=True):
            seq, draft = seqs[i], drafts[i]
            out = accept(seq, token_id, logprob)
            forced = len(out.new_token_ids) != 1  # a grammar appended tokens of its own
            prev = outputs[i]
            outputs[i] = out if prev is None else _merge(prev, out)
            if out.finished or forced:
                continue
            if depth < len(draft) and token_id == draft[depth]:
                seq.num_computed_tokens += 1
                accepted[i] += 1
                still.append(i)
        active = still
        depth += 1
    return [out for out in outputs if out is not None], accepted


def _merge(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """One step's outputs for one request (several accepted tokens) as one delta."""
    then.new_token_ids = first.new_token_ids + then.new_token_ids
    then.new_text = first.new_text + then.new_text
    then.new_logprobs = first.new_logprobs + then.new_logprobs
    then.timings = then.timings or first.timings
    return then
