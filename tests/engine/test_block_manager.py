"""BlockManager at toy sizes: exact block ids, hits and eviction order."""

from __future__ import annotations

from engine.block_manager import BlockManager
from tests.helpers import make_seq


def _compute_all(bm: BlockManager, seq) -> None:
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)


def test_allocate_gives_enough_distinct_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(10)))
    bm.allocate(seq)
    assert len(seq.block_table) == 3 and len(set(seq.block_table)) == 3
    assert bm.num_free_blocks == 5
    assert seq.num_computed_tokens == 0


def test_computed_prefix_is_reused_after_free():
    """A finished sequence's full blocks serve the next sequence with the same prefix."""
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(a)
    _compute_all(bm, a)
    a_blocks = list(a.block_table)
    bm.free(a)
    b = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 42, 43])
    bm.allocate(b)
    assert b.block_table[:2] == a_blocks[:2]
    assert b.num_cached_tokens == b.num_computed_tokens == 8


def test_uncomputed_blocks_are_never_hits():
    """Blocks whose KV is not computed yet (mid chunked prefill) must not be shared."""
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(a)  # allocated, nothing computed
    b = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9], rid="b")
    bm.allocate(b)
    assert b.num_cached_tokens == 0
    assert not set(a.block_table) & set(b.block_table)


def test_tenant_salt_isolates_cache():
    """Another tenant's identical prompt gets no hit from blocks that are cached, which the
    owner's repeat proves first (so the miss is isolation, not an empty cache)."""
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9], salt=b"tenant-a")
    bm.allocate(a)
    _compute_all(bm, a)
    a_blocks = a.block_table[:2]
    bm.free(a)
    again = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9], rid="again", salt=b"tenant-a")
    assert bm.match_prefix(again) == a_blocks  # positive control: A's blocks are indexed
    b = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9], rid="b", salt=b"tenant-b")
    assert bm.match_prefix(b) == []


def test_full_hit_still_leaves_a_token_to_compute():
    """An exact repeat of a block-aligned prompt recomputes its last block (logits needed)."""
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(list(range(8)))
    bm.allocate(a)
    _compute_all(bm, a)
    bm.free(a)
    b = make_seq(list(range(8)))
    bm.allocate(b)
    assert b.num_computed_tokens == 4 < b.num_tokens


def test_shared_block_is_not_freed_while_referenced():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq([1, 2, 3, 4, 5])
    bm.allocate(a)
    _compute_all(bm, a)
    b = make_seq([1, 2, 3, 4, 6], rid="b")
    bm.allocate(b)
    shared = a.block_table[0]
    assert b.block_table[0] == shared and bm.ref_counts[shared] == 2
    bm.free(a)
    assert bm.ref_counts[shared] == 1 and shared not in bm.free_ids
    bm.free(b)
    assert bm.ref_counts[shared] == 0 and shared in bm.free_ids


def test_eviction_takes_keyless_then_least_recently_freed():
    """Blocks with nothing reusable go first, then the oldest freed; a recent prefix survives."""
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq([1, 2, 3, 4])
    bm.allocate(a)
    _compute_all(bm, a)
    a_blocks = list(a.block_table)
    bm.free(a)
    b = make_seq([9, 9, 8, 8], rid="b")
    bm.allocate(b)  # takes the two never-used blocks first
    assert not set(b.block_table) & set(a_blocks)
    _compute_all(bm, b)
    bm.free(b)
    c = make_seq([5, 5, 6, 6], rid="c")
    bm.allocate(c)  # now evicts a's blocks (freed before b's)
    assert set(c.block_table) == set(a_blocks)
    assert len(bm.match_prefix(make_seq([9, 9, 8, 8, 7]))) == 2  # b is still a full hit
    assert bm.match_prefix(make_seq([1, 2, 3, 4, 7])) == []


def test_tail_blocks_are_evicted_before_head_blocks():
    bm = BlockManager(num_blocks=3, block_size=2)
    a = make_seq([1, 2, 3, 4, 5, 6])
    bm.allocate(a)
    _compute_all(bm, a)
    head, mid, tail = a.block_table
    bm.free(a)
    assert next(iter(bm.free_ids)) == tail
    b = make_seq([7, 7], rid="b")
    bm.allocate(b)
    assert b.block_table == [tail]
    assert bm.match_prefix(make_seq([1, 2, 3, 4, 5, 6, 9])) == [head, mid]


def test_can_allocate_respects_free_hits_and_watermark():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq([1, 2, 3, 4, 5, 6])
    assert bm.can_allocate(a)
    assert not bm.can_allocate(a, watermark_blocks=2)
    big = make_seq(list(range(9)))
    assert not bm.can_allocate(big)
