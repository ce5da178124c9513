"""Paged KV blocks: a pool with ref counts, an LRU free queue, and hash-chained prefix reuse.

A block is `block_size` token slots in every layer's cache. Full, computed blocks are
registered under their chain key (kvstore.keys), so a later sequence with the same prefix
(same model, same tenant salt) maps the same physical blocks instead of recomputing them.
Unreferenced blocks stay cached until the pool needs them: the free queue evicts
least-recently-freed first, and blocks that hold no reusable KV are handed out before any
cached one.
"""

from __future__ import annotations

from collections import OrderedDict

from engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_keys: list[bytes | None] = [None] * num_blocks
        self.key_to_block: dict[bytes, int] = {}
        # NOTE: insertion order is eviction order; the front is taken first.
        self.free_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks that hold a prefix of `seq`, stopping at the first miss.

        At least one prompt token is always left to compute, so the last logits exist.
        """
        if not self.enable_prefix_caching:
            return []
        hits: list[int] = []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        for key in seq.full_block_keys(self.block_size, max_blocks):
            block_id = self.key_to_block.get(key)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, seq: Sequence, watermark_blocks: int = 0) -> bool:
        hits = self.match_prefix(seq)
        num_free_hits = sum(1 for b in hits if self.ref_counts[b] == 0)
        needed = self.num_blocks_for(seq.num_tokens) - len(hits)
        return self.num_free_blocks - num_free_hits - needed >= watermark_blocks

    def allocate(self, seq: Sequence) -> None:
        """Map `seq`'s cached prefix and give it fresh blocks for the rest of its tokens."""
        assert not seq.block_table, "sequence already holds blocks"
        hits = self.match_prefix(seq)
        for block_id in hits:
            if self.ref_counts[block_id] == 0:
                del self.free_ids[block_id]
            self.ref_counts[block_id] += 1
            seq.block_table.append(block_id)
            seq.block_keys.append(self.block_keys[block_id])  # type: ignore[arg-type]
        seq.num_computed_tokens = len(hits) * self.block_size
        self.ensure_slots(seq, seq.num_tokens)
        prefix = seq.prefix_kv
        if prefix is not None:
            # Stored KV beyond the local hits fills fresh blocks (copied in by the runner,
            # layer by layer, during this sequence's first step); one token stays to compute.
            num_stored = min(prefix.num_blocks, (seq.num_tokens - 1) // self.block_size)
            if num_stored > len(hits):
                seq.pending_import = [
                    (seq.block_table[i], prefix.blocks[i]) for i in range(len(hits), num_stored)
                ]
                seq.num_computed_tokens = num_stored * self.block_size
        if seq.num_admissions == 0:  # re-admission after preemption keeps the first figure
            seq.num_cached_tokens = seq.num_computed_tokens
        seq.num_admissions += 1

    def can_ensure_slots(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_blocks_for(num_tokens) - len(seq.block_table) <= self.num_free_blocks

    def ensure_slots(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq.block_table` so that `num_tokens` tokens have a slot."""
        while len(seq.block_table) < self.num_blocks_for(num_tokens):
            seq.block_table.append(self._take_free_block())

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; its blocks stay cached until reused."""
        # NOTE: tail blocks are queued before head blocks so a shared prefix outlives its tail;
        # blocks with no key hold nothing reusable and go to the front.
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self.free_ids[block_id] = None
                if self.block_keys[block_id] is None:
                    self.free_ids.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.block_keys = []
        seq.pending_import = []
        seq.num_computed_tokens = 0

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register blocks that became full and computed since the last call."""
        keys = seq.full_block_keys(self.block_size, seq.num_computed_tokens // self.block_size)
        for i in range(len(seq.block_keys), len(keys)):
            key, block_id = keys[i], seq.block_table[i]
            seq.block_keys.append(key)
            # NOTE: a key computed twice concurrently keeps its first block; the duplicate
            # stays private to its sequence and is recycled when freed.
            if self.enable_prefix_caching and key not in self.key_to_block:
                self.key_to_block[key] = block_id
                self.block_keys[block_id] = key

    def _take_free_block(self) -> int:
        if not self.free_ids:
            raise RuntimeError("KV block pool exhausted")
        block_id, _ = self.free_ids.popitem(last=False)
        key = self.block_keys[block_id]
        if key is not None:
            del self.key_to_block[key]
            self.block_keys[block_id] = None
        self.ref_counts[block_id] = 1
        return block_id
