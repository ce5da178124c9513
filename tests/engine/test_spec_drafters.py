"""Draft-free drafters: prompt lookup (ngram) and SuffixDecoding (suffix), at toy sizes."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np

from engine.spec.ngram import NgramDrafter, find_continuation
from engine.spec.suffix import SuffixDrafter, SuffixTree

# A 12-token run that occurs nowhere else in the texts below.
RUN = list(range(100, 112))


def ngram(min_n: int, max_n: int, token_ids: list[int], max_tokens: int = 8) -> list[int]:
    return NgramDrafter(min_n, max_n).propose("r", b"t", token_ids, len(token_ids), max_tokens)


def test_ngram_prefers_most_recent_occurrence():
    """Of two earlier copies of the suffix, the later one's continuation is drafted:
    agents repeat their latest text."""
    token_ids = [1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3]
    assert ngram(2, 3, token_ids, max_tokens=3) == [7, 5, 1]


def test_ngram_prefers_longer_match_over_recency():
    """[2, 3, 4] matched once beats a more recent [3, 4]: a longer match predicts better."""
    token_ids = [2, 3, 4, 9, 3, 4, 8, 2, 3, 4]
    assert ngram(2, 3, token_ids, max_tokens=1) == [9]
    assert ngram(2, 2, token_ids, max_tokens=1) == [8]


def test_ngram_no_match_is_empty():
    assert ngram(2, 4, [1, 2, 3, 4, 5, 6, 2, 4]) == []
    assert ngram(1, 4, [7]) == []


def test_ngram_respects_max_tokens():
    token_ids = [1, 2, 3, 4, 5, 6, 1, 2]
    assert ngram(2, 2, token_ids, max_tokens=0) == []
    assert ngram(2, 2, token_ids, max_tokens=2) == [3, 4]
    assert ngram(2, 2, token_ids, max_tokens=100) == [3, 4, 5, 6, 1, 2]


def test_ngram_final_position_is_not_a_match():
    """The suffix always matches itself; that copy has no continuation and must not count."""
    assert ngram(1, 3, [1, 2, 3]) == []
    # Overlapping copies are fine: the copy ending one token earlier continues with 4.
    assert ngram(1, 1, [4, 4]) == [4]


def test_ngram_incremental_cache_matches_fresh_and_finish_drops_it():
    """Growing one request's token list gives the same drafts as matching from scratch."""
    rng = random.Random(0)
    drafter = NgramDrafter(1, 4)
    token_ids: list[int] = []
    for _ in range(300):
        token_ids.append(rng.randrange(6))
        drafted = drafter.propose("r", b"t", token_ids, 1, 5)
        assert drafted == find_continuation(np.array(token_ids), 1, 4, 5)
    assert drafter.num_cached_requests() == 1
    drafter.finish("r", b"t", token_ids)
    assert drafter.num_cached_requests() == 0


def test_suffix_tree_match_finds_longest_path():
    tree = SuffixTree(max_depth=6)
    tree.add_sequence([1, 2, 3, 4, 9, 2, 3, 5])
    node, match_len = tree.match([7, 1, 2, 3])
    assert match_len == 3
    assert tree.count[node] == 1
    assert tree.match([8, 8, 2, 3])[1] == 2
    assert tree.match([8])[1] == 0


def test_suffix_most_frequent_continuation_and_score():
    """After [1, 2] came 3 twice and 4 once: draft 3 (p = 2/3), then 1 (p stays 2/3)."""
    tree = SuffixTree(max_depth=8)
    tree.add_sequence([1, 2, 3, 1, 2, 3, 1, 2, 4])
    tokens, score = tree.draft([1, 2], 8, 1.0, 0.0, 0.1)
    assert tokens == [3, 1]  # budget = floor(1.0 * match_len 2)
    assert score == 2 / 3 + 2 / 3


def test_suffix_min_token_prob_cuts_the_draft():
    tree = SuffixTree(max_depth=8)
    # [5] then 6 (4 of 5 times); [5, 6] then 7 or 8 evenly.
    tree.add_sequence([5, 6, 7, 5, 6, 8, 5, 6, 7, 5, 6, 8, 5, 0])
    assert tree.draft([5], 8, 4.0, 0.0, 0.5)[0] == [6]  # 0.8, then 0.8 * 0.5 < 0.5
    # Ties go to the continuation seen first; past [5, 6, 7] the text is certain (p stays 0.4).
    assert tree.draft([5], 8, 4.0, 0.0, 0.3)[0] == [6, 7, 5, 6]
    assert tree.draft([5], 8, 4.0, 0.0, 0.9)[0] == []


def test_suffix_budget_grows_with_match_length():
    """floor(max_spec_factor * match_len): a longer match earns a longer draft."""
    lengths = []
    for match_len in (1, 2, 5):
        token_ids = [*RUN, 0, *RUN[:match_len]]
        drafter = SuffixDrafter(max_depth=24, max_spec_factor=1.0, min_token_prob=0.1)
        drafted = drafter.propose("r", b"t", token_ids, len(token_ids), 16)
        assert drafted == RUN[match_len : 2 * match_len]
        lengths.append(len(drafted))
    assert lengths == [1, 2, 5]
    drafter = SuffixDrafter(max_spec_factor=0.5, max_spec_offset=1.0)
    assert len(drafter.propose("r", b"t", [*RUN, 0, *RUN[:4]], 0, 16)) == 3
    assert drafter.propose("s", b"t", [*RUN, 0, *RUN[:4]], 0, 0) == []


def test_suffix_end_of_text_is_not_a_continuation():
    """The request's own suffix is indexed but, having no next token, is drafted from never."""
    drafter = SuffixDrafter()
    assert drafter.propose("r", b"t", [4, 5, 6, 7], 4, 8) == []
    tree = SuffixTree(max_depth=8)
    tree.extend([4, 5, 6])
    assert tree.count_of([5, 6]) == 1
    assert tree.draft([5, 6], 8, 1.0, 0.0, 0.1) == ([], 0.0)


def test_suffix_drafts_past_max_depth():
    """A match as long as the trie is deep still drafts the whole repeated run."""
    run = list(range(200, 240))
    drafter = SuffixDrafter(max_depth=8, max_spec_factor=4.0)
    token_ids = [*run, 0, *run[:10]]
    assert drafter.propose("r", b"t", token_ids, len(token_ids), 20) == run[10:30]


def _substring_counts(seqs: list[list[int]], max_depth: int) -> Counter[tuple[int, ...]]:
    counts: Counter[tuple[int, ...]] = Counter()
    for seq in seqs:
        for start in range(len(seq)):
            for end in range(start + 1, min(len(seq), start + max_depth) + 1):
                counts[tuple(seq[start:end])] += 1
    return counts


def test_suffix_incremental_extend_equals_building_from_scratch():
    """Chunked extends give the counts of a brute-force count and the drafts of one extend."""
    rng = random.Random(1)
    for _ in range(40):
        max_depth, vocab = rng.randint(2, 8), rng.randint(2, 4)
        seq = [rng.randrange(vocab) for _ in range(rng.randint(1, 60))]
        chunked, whole = SuffixTree(max_depth), SuffixTree(max_depth)
        whole.extend(seq)
        pos = 0
        while pos < len(seq):
            step = rng.randint(1, 7)
            chunked.extend(seq[pos : pos + step])
            pos += step
        for pattern, num in _substring_counts([seq], max_depth).items():
            assert chunked.count_of(list(pattern)) == num == whole.count_of(list(pattern))
        for end in range(1, len(seq) + 1):
            context = seq[:end]
            assert chunked.draft(context, 6, 1.0, 1.0, 0.1) == whole.draft(
                context, 6, 1.0, 1.0, 0.1
            )


def test_suffix_remove_sequence_leaves_exact_counts():
    """Adding, extending and removing in any order keeps every substring count exact."""
    rng = random.Random(2)
    for _ in range(60):
        max_depth, vocab = rng.randint(2, 7), rng.randint(2, 4)
        tree, seqs = SuffixTree(max_depth), {}
        for _ in range(8):
            if rng.random() < 0.5 or not seqs:
                seq = [rng.randrange(vocab) for _ in range(rng.randint(0, 25))]
                seqs[tree.add_sequence(seq)] = seq
            else:
                tree.remove_sequence(rng.choice(sorted(seqs)))
                seqs = {i: s for i, s in seqs.items() if i in tree.seqs}
            expected = _substring_counts(list(seqs.values()), max_depth)
            for pattern, num in expected.items():
                assert tree.count_of(list(pattern)) == num
            assert tree.count[0] == sum(map(len, seqs.values()))
        for seq_id in list(seqs):
            tree.remove_sequence(seq_id)
        assert tree.num_nodes == 1  # only the root is left: evicted nodes are freed


def test_suffix_tenant_outputs_stay_with_their_tenant():
    """Tenant A's finished output drafts for A's next request and never for tenant B."""
    drafter = SuffixDrafter()
    drafter.propose("a1", b"A", [1, 2, 3], 3, 8)
    drafter.finish("a1", b"A", RUN)
    context = [7, 8, *RUN[:6]]
    assert drafter.propose("b1", b"B", context, 2, 8) == []
    assert drafter.propose("a2", b"A", context, 2, 8) == RUN[6:12]


def test_suffix_tenant_cache_keeps_only_recent_outputs():
    drafter = SuffixDrafter(cache_requests=2)
    outputs = [[10 * i + j for j in range(1, 9)] for i in range(1, 4)]
    for i, output in enumerate(outputs):
        drafter.finish(f"r{i}", b"A", output)
    tree = drafter.tenant_tree(b"A")
    assert tree is not None
    assert tree.count_of(outputs[0][:3]) == 0  # the oldest was evicted
    assert tree.count_of(outputs[1][:3]) == tree.count_of(outputs[2][:3]) == 1
    assert drafter.propose("x", b"A", [0, *outputs[0][:4]], 1, 4) == []
    assert drafter.propose("y", b"A", [0, *outputs[2][:4]], 1, 4) == outputs[2][4:8]


def test_suffix_finish_drops_request_state():
    drafter = SuffixDrafter()
    drafter.propose("r", b"A", [1, 2, 3, 1, 2], 5, 4)
    assert drafter.num_live_requests() == 1
    drafter.finish("r", b"A", [])
    assert drafter.num_live_requests() == 0
    assert drafter.tenant_tree(b"A") is None  # an empty output caches nothing


def test_suffix_ties_go_to_the_request_tree():
    """Same score from both tries: the request's own continuation is drafted."""
    drafter = SuffixDrafter()
    drafter.finish("old", b"A", [5, 6, 7, 8])
    assert drafter.propose("r", b"A", [5, 6, 9, 9, 5, 6], 2, 2) == [9, 9]
