"""Oracle block ranking for the sparse-attention bench (not an engine feature).

Ranks score blocks by their *true* attention mass: every key of every block is read and
scored exactly, softmax over the whole context, summed per block and over the GQA group.
Selection, budgets and attention are otherwise the engine's. What the oracle variant loses
against dense is the price of the budget itself; what a summary variant loses beyond the
oracle is the price of its cheap estimate.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from engine.kernels import sparse_attention as sparse_ref


class OraclePrims:
    """`sparse_attention.Primitives` whose block_mass reads the keys themselves."""

    def __init__(self, kv_layers: list[torch.Tensor], summary_layers: list[torch.Tensor]):
        self.kv_by_summaries = {
            s.data_ptr(): kv for s, kv in zip(summary_layers, kv_layers, strict=True)
        }

    def block_mass(self, q, summaries, phys, num_full, mode, scale):  # type: ignore[no-untyped-def]
        kv = self.kv_by_summaries[summaries.data_ptr()]
        num_sub = summaries.shape[0]
        _, num_blocks, block_size, kv_heads, head_dim = kv.shape
        sbs = num_blocks * block_size // num_sub
        num_seqs, width = phys.shape
        keys = kv[0].reshape(num_sub, sbs, kv_heads, head_dim).index_select(0, phys.reshape(-1))
        keys = keys.view(num_seqs, width, sbs, kv_heads, head_dim).float()
        scores = torch.einsum("bkgd,bntkd->bkgnt", q.float(), keys) * scale
        is_full = torch.arange(width, device=q.device) < num_full[:, None]
        scores = scores.masked_fill(~is_full[:, None, None, :, None], float("-inf"))
        probs = scores.flatten(-2).softmax(-1).nan_to_num(0.0).view_as(scores)
        return probs.sum(dim=(2, 4))

    def sparse_paged_attention(self, *args):  # type: ignore[no-untyped-def]
        return sparse_ref.sparse_paged_attention(*args)


@contextmanager
def oracle_ranking(
    kv_layers: list[torch.Tensor], summary_layers: list[torch.Tensor]
) -> Iterator[None]:
    """Within the block, sparse decode ranks blocks by the oracle (the reference path)."""
    saved = sparse_ref._REFERENCE
    sparse_ref._REFERENCE = OraclePrims(kv_layers, summary_layers)  # type: ignore[assignment]
    try:
        yield
    finally:
        sparse_ref._REFERENCE = saved
