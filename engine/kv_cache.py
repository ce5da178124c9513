"""The KV cache tensor of one engine, and block export/import for the KV store and PD handoff.

Layout: `[layers, 2, num_blocks, block_size, kv_heads, head_dim]`. A *Full Block* (the unit
the KV store persists) is `[layers, 2, block_size, kv_heads, head_dim]`; a *Layer Block* is
its `[2, block_size, kv_heads, head_dim]` slice for one layer, so concatenating a block's
layer slices along a new leading dim gives the Full Block without any relayout.

With sparse attention the cache also keeps per-score-block key summaries
`[layers, num_blocks * blocks_per_kv_block, S, kv_heads, head_dim]` (engine/kernels/
sparse_attention.py). Attention writes them as score blocks fill; imports recompute them.
"""

from __future__ import annotations

import torch

from engine.config import ModelConfig
from engine.kernels import ops
from engine.kernels.sparse_attention import SparseSpec


class KVCache:
    def __init__(
        self,
        model: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        sparse: SparseSpec | None = None,
    ):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.tensor = torch.zeros(
            model.num_hidden_layers,
            2,
            num_blocks,
            block_size,
            model.num_kv_heads,
            model.head_size,
            dtype=dtype,
            device=device,
        )
        self.sparse: SparseSpec | None = None
        self.summaries: torch.Tensor | None = None
        if sparse is not None:
            self.reset_summaries(sparse)

    @property
    def full_block_shape(self) -> tuple[int, ...]:
        layers, two, _, bs, kvh, hd = self.tensor.shape
        return (layers, two, bs, kvh, hd)

    def layer_views(self) -> list[torch.Tensor]:
        """Per layer `[2, num_blocks, block_size, kv_heads, head_dim]` views (no copy)."""
        return list(self.tensor.unbind(0))

    def reset_summaries(self, sparse: SparseSpec) -> None:
        """(Re)build the key summaries for `sparse` (its mode and score block size) from the
        KV now in the cache, e.g. to compare summary kinds over the same prefilled KV."""
        if self.block_size % sparse.score_block_size:
            raise ValueError("score_block_size must divide the KV block size")
        layers, _, _, _, kv_heads, head_dim = self.tensor.shape
        self.sparse = sparse
        self.sub_per_block = self.block_size // sparse.score_block_size
        self.summaries = torch.zeros(
            layers,
            self.num_blocks * self.sub_per_block,
            sparse.summary_width,
            kv_heads,
            head_dim,
            dtype=self.tensor.dtype,
            device=self.tensor.device,
        )
        self.refresh_summaries(list(range(self.num_blocks)))

    def summary_views(self) -> list[torch.Tensor] | None:
        """Per layer `[num_sub_blocks, S, kv_heads, head_dim]` views, or None when dense."""
        return None if self.summaries is None else list(self.summaries.unbind(0))

    def refresh_summaries(self, block_ids: list[int], layers: list[int] | None = None) -> None:
        """Recompute the key summaries of every score block of `block_ids` (after KV was
        copied in behind attention's back). A no-op for a dense cache.

        NOTE: a partial block's summary covers stale slots too; selection never scores the
        block holding the last token (the window always reads it), and the summary is
        rewritten when the block fills.
        """
        if self.summaries is None or self.sparse is None or not block_ids:
            return
        spb = self.sub_per_block
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.tensor.device)
        subs = (idx[:, None] * spb + torch.arange(spb, device=idx.device)).reshape(-1)
        for layer in range(self.tensor.shape[0]) if layers is None else layers:
            ops.update_summaries(self.tensor[layer], self.summaries[layer], subs, self.sparse)

    def export_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Full Blocks `[n, layers, 2, block_size, kv_heads, head_dim]` (a copy, on CPU)."""
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.tensor.device)
        return self.tensor.index_select(2, idx).permute(2, 0, 1, 3, 4, 5).contiguous().cpu()

    def export_layer(self, layer: int, block_ids: list[int]) -> torch.Tensor:
        """Layer Blocks of one layer `[n, 2, block_size, kv_heads, head_dim]` (a copy)."""
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.tensor.device)
        return self.tensor[layer].index_select(1, idx).transpose(0, 1).contiguous().cpu()

    def import_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        """Write Full Blocks `[n, layers, 2, block_size, kv_heads, head_dim]` into `block_ids`."""
        expected = (len(block_ids), *self.full_block_shape)
        if tuple(data.shape) != expected:
            raise ValueError(f"KV blocks of shape {tuple(data.shape)}, expected {expected}")
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.tensor.device)
        src = data.to(self.tensor.device, self.tensor.dtype).permute(1, 2, 0, 3, 4, 5)
        self.tensor.index_copy_(2, idx, src)
        self.refresh_summaries(block_ids)

    def import_layer(self, layer: int, block_ids: list[int], data: torch.Tensor) -> None:
        """Write one layer's Layer Blocks `[n, 2, block_size, kv_heads, head_dim]`."""
        expected = (len(block_ids), *self.full_block_shape[1:])
        if tuple(data.shape) != expected:
            raise ValueError(f"layer KV of shape {tuple(data.shape)}, expected {expected}")
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.tensor.device)
        src = data.to(self.tensor.device, self.tensor.dtype).transpose(0, 1)
        self.tensor[layer].index_copy_(1, idx, src)
        self.refresh_summaries(block_ids, [layer])
