"""PE batch formation with a compute quota (the DualPath paper's §6.2): prefill chunks join
the step in FIFO order while the predicted time stays within the quota; the request that
would overflow it is chunk-prefilled with a binary-searched size. No model."""

from __future__ import annotations

import pytest

from engine.batch_scheduler import BatchScheduler
from engine.block_manager import BlockManager
from engine.cost_model import PrefillCostModel, attention_work
from tests.helpers import make_seq

LINEAR = PrefillCostModel(per_token_s=1e-3, per_pair_s=0.0)  # 1 ms per token


def scheduler(quota_s: float, cost: PrefillCostModel = LINEAR) -> BatchScheduler:
    cost = PrefillCostModel(cost.per_token_s, cost.per_pair_s)
    return BatchScheduler(
        BlockManager(256, 16),
        max_num_seqs=16,
        max_num_batched_tokens=4096,
        compute_quota_s=quota_s,
        cost_model=cost,
    )


def test_fifo_until_the_quota_then_the_overflowing_request_is_chunked():
    sched = scheduler(quota_s=0.3)  # 300 tokens at 1 ms each
    for rid, n in (("a", 120), ("b", 100), ("c", 200), ("d", 50)):
        sched.add(make_seq(list(range(n)), rid=rid))
    plan = sched.schedule()
    # a and b fit (220 ms); c gets the remaining 80 ms as a chunk; d waits (FIFO)
    assert [(c.seq.request_id, c.num_tokens) for c in plan.chunks] == [
        ("a", 120),
        ("b", 100),
        ("c", 80),
    ]
    assert [s.request_id for s in sched.waiting] == ["d"]


def test_the_chunked_request_continues_first_in_the_next_step():
    sched = scheduler(quota_s=0.3)
    sched.add(make_seq(list(range(500)), rid="long"))
    starts = []
    for _ in range(2):
        plan = sched.schedule()
        (chunk,) = plan.chunks
        starts.append((chunk.start, chunk.num_tokens))
        chunk.seq.num_computed_tokens = chunk.start + chunk.num_tokens
    assert starts == [(0, 300), (300, 200)]


def test_attention_cost_shrinks_chunks_after_a_long_cached_prefix():
    cost = PrefillCostModel(per_token_s=1e-4, per_pair_s=1e-6)
    sched = scheduler(quota_s=0.3, cost=cost)
    seq = make_seq(list(range(2000)), rid="x")
    sched.add(seq)
    first = sched.schedule().chunks[0]
    seq.num_computed_tokens = first.num_tokens
    second = sched.schedule().chunks[0]
    assert second.num_tokens < first.num_tokens  # more cached keys per query: fewer tokens
    for chunk in (first, second):
        assert cost.predict(chunk.start, chunk.num_tokens) <= 0.3
        assert cost.predict(chunk.start, chunk.num_tokens + 1) > 0.3


def test_a_step_always_makes_progress_even_past_the_quota():
    sched = scheduler(quota_s=1e-6)
    sched.add(make_seq(list(range(100)), rid="a"))
    (chunk,) = sched.schedule().chunks
    assert chunk.num_tokens >= 1


def test_no_quota_keeps_the_token_budget_behaviour():
    sched = BatchScheduler(BlockManager(256, 16), max_num_seqs=16, max_num_batched_tokens=4096)
    for rid in "abc":
        sched.add(make_seq(list(range(400)), rid=rid))
    assert [c.num_tokens for c in sched.schedule().chunks] == [400, 400, 400]


@pytest.mark.parametrize("a, b", [(2e-4, 3e-8), (1e-3, 0.0), (5e-5, 1e-7)])
def test_cost_model_fit_recovers_the_constants_from_steps(a, b):
    model = PrefillCostModel()
    for cached, n in [(0, 64), (512, 128), (2048, 32), (0, 512), (1024, 256), (4096, 64)] * 3:
        model.observe(n, attention_work(cached, n), a * n + b * attention_work(cached, n))
    assert model.per_token_s == pytest.approx(a, rel=1e-3)
    assert model.per_pair_s == pytest.approx(b, rel=1e-3, abs=1e-12)
