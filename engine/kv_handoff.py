"""KV in and out of an EngineCore: PD handoff export/import, stored-prefix checks, and
per-block persistence. A mixin so core.py stays the request/step story; it uses only the
engine's block manager, runner and sequences.
"""

from __future__ import annotations

import torch

from engine.block_manager import BlockManager
from engine.errors import InvalidRequestError
from engine.kv_import import PrefixKV
from engine.output import SequenceKV
from engine.runner import ModelRunner
from engine.sequence import Sequence


class KVHandoffMixin:
    block_manager: BlockManager
    runner: ModelRunner
    seqs: dict[str, Sequence]
    persist_out: list[tuple[bytes, torch.Tensor]]

    def drain_persist(self) -> list[tuple[bytes, torch.Tensor]]:
        """Full blocks that filled since the last call, as (key, Full Block copy)."""
        out, self.persist_out = self.persist_out, []
        return out

    def _collect_persist(self, seq: Sequence) -> None:
        start = seq.persist_from_block
        if start is None or len(seq.block_keys) <= start:
            return
        ids = seq.block_table[start : len(seq.block_keys)]
        # NOTE: copied now: once the sequence finishes its blocks may be reused at once.
        data = self.runner.kv_cache.export_blocks(ids)
        self.persist_out.extend(zip(seq.block_keys[start:], data.unbind(0), strict=True))
        seq.persist_from_block = len(seq.block_keys)

    def export_kv(self, request_id: str, num_de_blocks: int = 0) -> SequenceKV:
        """Copy out the computed KV of an unfinished request as Full Blocks, from
        `num_de_blocks` on (the receiver holds the blocks before it).

        Raises:
            InvalidRequestError: the request is unknown or already finished.
        """
        seq = self.seqs.get(request_id)
        if seq is None:
            raise InvalidRequestError(f"no unfinished request {request_id!r} to export")
        n = seq.num_computed_tokens
        num_de_blocks = min(num_de_blocks, n // self.block_manager.block_size)
        blocks = seq.block_table[num_de_blocks : self.block_manager.num_blocks_for(n)]
        data = self.runner.kv_cache.export_blocks(blocks)
        return SequenceKV(
            list(seq.token_ids[:n]), list(seq.block_keys), data, num_de_blocks=num_de_blocks
        )

    @staticmethod
    def _resume(seq: Sequence, kv: SequenceKV) -> None:
        """Continue a request whose first tokens were sampled elsewhere (PD handoff)."""
        seq.token_ids.extend(kv.output_token_ids)

    def _check_prefix(self, seq: Sequence, prefix: PrefixKV) -> None:
        bm = self.block_manager
        if seq.full_block_keys(bm.block_size, prefix.num_blocks) != prefix.block_keys:
            # NOTE: keys bind KV to model + tenant + tokens; a mismatch is never imported.
            raise InvalidRequestError("stored KV block keys do not match this prompt/tenant")
        shape = self.runner.kv_cache.full_block_shape
        dtype = self.runner.kv_cache.tensor.dtype
        for block in prefix.blocks:
            if block.dtype != dtype:
                # NOTE: keys do not bind the KV dtype; converted KV would change the output.
                raise InvalidRequestError(f"stored KV block is {block.dtype}, this engine {dtype}")
            if tuple(block.shape) != shape:
                raise InvalidRequestError(
                    f"stored KV block of shape {tuple(block.shape)}, this engine needs {shape}"
                )

    def _import_kv(self, seq: Sequence, kv: SequenceKV, prefix: PrefixKV | None) -> None:
        bm = self.block_manager
        num_full = kv.num_tokens // bm.block_size
        if seq.full_block_keys(bm.block_size, num_full) != kv.block_keys:
            # NOTE: keys bind KV to model + tenant + tokens; a mismatch is never imported.
            raise InvalidRequestError("imported KV block keys do not match this prompt/tenant")
        num_blocks = bm.num_blocks_for(kv.num_tokens)
        expected = (num_blocks - kv.num_de_blocks, *self.runner.kv_cache.full_block_shape)
        if tuple(kv.data.shape) != expected:
            raise InvalidRequestError(
                f"imported KV has shape {tuple(kv.data.shape)}, this engine needs {expected}"
            )
        if kv.num_de_blocks and (prefix is None or prefix.num_blocks < kv.num_de_blocks):
            raise InvalidRequestError("imported KV starts after blocks this engine lacks")
        if bm.num_blocks_for(seq.num_tokens) > bm.num_free_blocks:
            raise InvalidRequestError("not enough free KV blocks to import this request")
        bm.ensure_slots(seq, seq.num_tokens)
        blocks = seq.block_table[:num_blocks]
        try:
            cache = self.runner.kv_cache
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
