"""KVPort: where KV enters and leaves an EngineCore, composed into it (`core.kv_port`).

Out: a prefill-only request's computed KV (PD handoff, `export`), and every full block that
fills from a sequence's `persist_from_block` on (`collect_persist` / `drain_persist`).
In: a stored prefix checked against the prompt (`check_prefix`) and imported KV
(`import_kv`). It uses only the engine's block manager and KV cache; sequences are passed in.
"""

from __future__ import annotations

import torch

from engine.block_manager import BlockManager
from engine.errors import InvalidRequestError
from engine.kv_cache import KVCache
from engine.kv_import import PrefixKV
from engine.output import SequenceKV
from engine.sequence import Sequence


class KVPort:
    def __init__(self, block_manager: BlockManager, kv_cache: KVCache):
        self.block_manager = block_manager
        self.kv_cache = kv_cache
        self.persist_out: list[tuple[bytes, torch.Tensor]] = []

    def drain_persist(self) -> list[tuple[bytes, torch.Tensor]]:
        """Full blocks that filled since the last call, as (key, Full Block copy)."""
        out, self.persist_out = self.persist_out, []
        return out

    def collect_persist(self, seq: Sequence) -> None:
        """Queue `seq`'s full blocks from its `persist_from_block` on for `drain_persist`."""
        start = seq.persist_from_block
        if start is None or len(seq.block_keys) <= start:
            return
        ids = seq.block_table[start : len(seq.block_keys)]
        # NOTE: copied now: once the sequence finishes its blocks may be reused at once.
        data = self.kv_cache.export_blocks(ids)
        self.persist_out.extend(zip(seq.block_keys[start:], data.unbind(0), strict=True))
        seq.persist_from_block = len(seq.block_keys)

    def export(self, seq: Sequence, num_de_blocks: int = 0) -> SequenceKV:
        """Copy out the computed KV of `seq` as Full Blocks, from `num_de_blocks` on (the
        receiver holds the blocks before it)."""
        n = seq.num_computed_tokens
        num_de_blocks = min(num_de_blocks, n // self.block_manager.block_size)
        blocks = seq.block_table[num_de_blocks : self.block_manager.num_blocks_for(n)]
        data = self.kv_cache.export_blocks(blocks)
        return SequenceKV(
            list(seq.token_ids[:n]), list(seq.block_keys), data, num_de_blocks=num_de_blocks
        )

    def check_prefix(self, seq: Sequence, prefix: PrefixKV) -> None:
        """Raise InvalidRequestError unless `prefix` is KV of `seq`'s leading full blocks
        (same keys), in this engine's block shape and dtype."""
        bm = self.block_manager
        if seq.full_block_keys(bm.block_size, prefix.num_blocks) != prefix.block_keys:
            # NOTE: keys bind KV to model + tenant + tokens; a mismatch is never imported.
            raise InvalidRequestError("stored KV block keys do not match this prompt/tenant")
        shape = self.kv_cache.full_block_shape
        dtype = self.kv_cache.tensor.dtype
        for block in prefix.blocks:
            if block.dtype != dtype:
                # NOTE: keys name the KV dtype too; this catches a block that lies about it.
                raise InvalidRequestError(f"stored KV block is {block.dtype}, this engine {dtype}")
            if tuple(block.shape) != shape:
                raise InvalidRequestError(
                    f"stored KV block of shape {tuple(block.shape)}, this engine needs {shape}"
                )

    def import_kv(self, seq: Sequence, kv: SequenceKV, prefix: PrefixKV | None) -> None:
        """Copy `kv` (and, before its `num_de_blocks`, `prefix`'s blocks) into new blocks of
        `seq`, not yet registered with the engine; raise InvalidRequestError (nothing kept)
        unless it is KV of this prompt/tenant that fits now."""
        bm = self.block_manager
        num_full = kv.num_tokens // bm.block_size
        if seq.full_block_keys(bm.block_size, num_full) != kv.block_keys:
            # NOTE: keys bind KV to model + tenant + tokens; a mismatch is never imported.
            raise InvalidRequestError("imported KV block keys do not match this prompt/tenant")
        num_blocks = bm.num_blocks_for(kv.num_tokens)
        expected = (num_blocks - kv.num_de_blocks, *self.kv_cache.full_block_shape)
        if tuple(kv.data.shape) != expected:
            raise InvalidRequestError(
                f"imported KV has shape {tuple(kv.data.shape)}, this engine needs {expected}"
            )
        if kv.data.dtype != self.kv_cache.tensor.dtype:
            # NOTE: a converted copy would silently change the output; refuse, as for stored KV
            raise InvalidRequestError(
                f"imported KV is {kv.data.dtype}, this engine {self.kv_cache.tensor.dtype}"
            )
        if kv.num_de_blocks and (prefix is None or prefix.num_blocks < kv.num_de_blocks):
            raise InvalidRequestError("imported KV starts after blocks this engine lacks")
        if bm.num_blocks_for(seq.num_tokens) > bm.num_free_blocks:
            raise InvalidRequestError("not enough free KV blocks to import this request")
        bm.ensure_slots(seq, seq.num_tokens)
        blocks = seq.block_table[:num_blocks]
        try:
            cache = self.kv_cache
            if kv.num_de_blocks:
                assert prefix is not None
                stored = torch.stack(prefix.blocks[: kv.num_de_blocks])
                cache.import_blocks(blocks[: kv.num_de_blocks], stored)
            cache.import_blocks(blocks[kv.num_de_blocks :], kv.data)
        except Exception:
            bm.free(seq)  # the sequence is not registered yet: nobody else would free them
            raise
        seq.num_computed_tokens = kv.num_tokens
        bm.cache_full_blocks(seq)
