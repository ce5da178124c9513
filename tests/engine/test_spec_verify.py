"""Speculative sampling is exact: the tokens verification keeps have the target model's
distribution whatever the draft (chi-square over many unseeded draws on a small vocabulary),
and the draft only decides how many rows are used."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from engine.output import RequestOutput
from engine.sampler import Sampler
from engine.spec.verify import verify
from tests.helpers import make_seq

VOCAB = 6
TRIALS = 6000


def chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile at p = 0.001 (Wilson-Hilferty; z is the normal quantile)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_matches(counts: Counter, probs: torch.Tensor, n: int) -> None:
    support = [t for t in range(VOCAB) if probs[t] > 0]
    assert set(counts) <= set(support), "drew a token the target gives no mass"
    stat = sum((counts[t] - n * probs[t].item()) ** 2 / (n * probs[t].item()) for t in support)
    assert stat < chi2_critical(len(support) - 1), (stat, counts, probs)


def target(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    scaled = logits / temperature
    if top_k:
        kth = scaled.topk(top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return scaled.softmax(-1)


def accept(seq, token_id, logprob) -> RequestOutput:
    seq.token_ids.append(token_id)
    return RequestOutput(seq.request_id, [token_id], "", False, None, 1, 0, 1)


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, 0), (0.7, 4)])
def test_verified_tokens_have_the_target_distribution(temperature, top_k):
    torch.manual_seed(0)
    logits = torch.randn(3, VOCAB) * 1.5
    probs = [target(row, temperature, top_k) for row in logits]
    x = int(probs[0].argsort()[-2])  # a likely but not the likeliest first token
    y = int(probs[1].argsort()[-1])
    sampler = Sampler(seed=1)
    firsts: Counter = Counter()
    seconds: Counter = Counter()
    third_rows = 0
    for i in range(TRIALS):
        seq = make_seq([1, 2, 3], rid=f"r{i}", temperature=temperature, top_k=top_k)
        outs, accepted = verify([seq], logits, [[x, y]], sampler, accept)
        tokens = outs[0].new_token_ids
        assert len(tokens) == accepted[0] + 1
        assert tokens[: accepted[0]] == [x, y][: accepted[0]]  # accepted = the draft's
        firsts[tokens[0]] += 1
        if tokens[0] == x:
            seconds[tokens[1]] += 1
        third_rows += accepted[0] == 2
    assert_matches(firsts, probs[0], TRIALS)
    assert_matches(seconds, probs[1], firsts[x])
    # acceptance is the target's own probability of the draft (no more, no less)
    expected = TRIALS * probs[0][x].item() * probs[1][y].item()
    assert abs(third_rows - expected) < 4 * math.sqrt(expected)


def test_greedy_keeps_the_draft_while_it_is_the_argmax():
    logits = torch.full((4, VOCAB), -1.0)
    logits[0, 2] = logits[1, 4] = logits[2, 1] = logits[3, 5] = 3.0
    seq = make_seq([1], temperature=0)
    outs, accepted = verify([seq], logits, [[2, 4, 0]], Sampler(), accept)
    assert outs[0].new_token_ids == [2, 4, 1] and accepted == [2]
    seq = make_seq([1], temperature=0)
    outs, accepted = verify([seq], logits, [[2, 4, 1]], Sampler(), accept)
    assert outs[0].new_token_ids == [2, 4, 1, 5] and accepted == [3]  # plus the bonus token
    assert seq.num_computed_tokens == 3  # the accepted positions' KV counts as computed
