"""Continuous batching policy at toy sizes (no model)."""

from __future__ import annotations

from engine.batch_scheduler import BatchScheduler
from engine.block_manager import BlockManager
from engine.sequence import SequenceStatus
from tests.helpers import make_seq


def _advance(plan, sampled_token: int = 7) -> None:
    """Mimic the engine: mark chunks computed and append a token where one is sampled."""
    for chunk in plan.chunks:
        chunk.seq.num_computed_tokens = chunk.start + chunk.num_tokens
        if chunk.samples:
            chunk.seq.token_ids.append(sampled_token)


def test_long_prompt_is_prefilled_in_budget_sized_chunks():
    sched = BatchScheduler(BlockManager(16, 4), max_num_seqs=4, max_num_batched_tokens=4)
    seq = make_seq(list(range(10)))
    sched.add(seq)
    sizes = []
    for _ in range(3):
        plan = sched.schedule()
        sizes.append([(c.start, c.num_tokens, c.samples) for c in plan.chunks])
        _advance(plan)
    assert sizes == [[(0, 4, False)], [(4, 4, False)], [(8, 2, True)]]
    plan = sched.schedule()
    assert [(c.start, c.num_tokens) for c in plan.chunks] == [(10, 1)]


def test_running_decodes_go_before_new_prefills_and_share_the_budget():
    sched = BatchScheduler(BlockManager(16, 4), max_num_seqs=4, max_num_batched_tokens=6)
    a = make_seq([1, 2, 3], rid="a")
    sched.add(a)
    _advance(sched.schedule())
    b = make_seq(list(range(20)), rid="b")
    sched.add(b)
    plan = sched.schedule()
    assert [(c.seq.request_id, c.num_tokens) for c in plan.chunks] == [("a", 1), ("b", 5)]


def test_max_num_seqs_caps_the_batch():
    sched = BatchScheduler(BlockManager(16, 4), max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        sched.add(make_seq([i, i], rid=str(i)))
    plan = sched.schedule()
    assert [c.seq.request_id for c in plan.chunks] == ["0", "1"]
    assert len(sched.waiting) == 1


def test_waiting_requests_run_by_priority_then_arrival():
    sched = BatchScheduler(BlockManager(64, 4), max_num_seqs=3, max_num_batched_tokens=100)
    for rid, priority in [("d1", 1), ("f1", 2), ("d2", 1), ("p1", 0), ("f2", 2), ("p2", 0)]:
        seq = make_seq([1, 2, 3], rid=rid)
        seq.priority = priority
        sched.add(seq)
    assert [s.request_id for s in sched.waiting] == ["p1", "p2", "d1", "d2", "f1", "f2"]
    plan = sched.schedule()
    assert [c.seq.request_id for c in plan.chunks] == ["p1", "p2", "d1"]


def test_urgent_prompt_goes_before_the_rest_of_a_less_urgent_one():
    sched = BatchScheduler(BlockManager(64, 4), max_num_seqs=4, max_num_batched_tokens=8)
    long = make_seq(list(range(20)), rid="default")
    long.priority = 1
    sched.add(long)
    _advance(sched.schedule())  # the first 8-token chunk
    flex = make_seq([1, 2], rid="flex")
    flex.priority = 2
    sched.add(flex)
    plan = sched.schedule()  # a less urgent prompt waits for the long one's 2nd chunk
    assert [(c.seq.request_id, c.num_tokens) for c in plan.chunks] == [("default", 8)]
    _advance(plan)
    urgent = make_seq([5, 6, 7], rid="priority")
    urgent.priority = 0
    sched.add(urgent)
    plan = sched.schedule()
    ids = [c.seq.request_id for c in plan.chunks]
    assert ids[0] == "priority" and "default" not in ids
    _advance(plan)
    plan = sched.schedule()  # nothing more urgent waits: the long prompt goes on
    assert "default" in [c.seq.request_id for c in plan.chunks]


def test_out_of_blocks_preempts_the_newest_and_requeues_it_first():
    bm = BlockManager(num_blocks=3, block_size=2)
    sched = BatchScheduler(bm, max_num_seqs=4, max_num_batched_tokens=100, watermark_blocks=0)
    a, b = make_seq([1, 2], rid="a"), make_seq([3, 4, 5, 6], rid="b")
    sched.add(a)
    sched.add(b)
    _advance(sched.schedule())  # a: 1 block, b: 2 blocks; pool empty; both sampled
    plan = sched.schedule()  # a needs a 2nd block for its 3rd token -> b is preempted
    assert [s.request_id for s in plan.preempted] == ["b"]
    assert [c.seq.request_id for c in plan.chunks] == ["a"]
    assert b.status is SequenceStatus.WAITING and sched.waiting[0] is b
    assert b.block_table == [] and b.num_computed_tokens == 0
    assert sched.num_preemptions == 1


def test_remove_frees_blocks_of_running_and_waiting():
    bm = BlockManager(num_blocks=4, block_size=2)
    sched = BatchScheduler(bm, max_num_seqs=1, max_num_batched_tokens=100, watermark_blocks=0)
    a, b = make_seq([1, 2, 3], rid="a"), make_seq([4], rid="b")
    sched.add(a)
    sched.add(b)
    sched.schedule()
    sched.remove(a)
    sched.remove(b)
    assert bm.num_free_blocks == 4 and sched.num_unfinished == 0


def test_request_filling_the_whole_pool_is_admitted_when_nothing_runs():
    """The watermark must not make a request that fits the pool wait forever."""
    bm = BlockManager(num_blocks=4, block_size=4)
    sched = BatchScheduler(bm, max_num_seqs=2, max_num_batched_tokens=100, watermark_blocks=1)
    seq = make_seq(list(range(16)))
    sched.add(seq)
    plan = sched.schedule()
    assert [c.seq for c in plan.chunks] == [seq] and bm.num_free_blocks == 0
