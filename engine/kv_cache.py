"""The KV cache tensor of one engine, and block export/import for the KV store and PD handoff.

Layout: `[layers, 2, num_blocks, block_size, kv_heads, head_dim]`. A *Full Block* (the unit
the KV store persists) is `[layers, 2, block_size, kv_heads, head_dim]`; a *Layer Block* is
its `[2, block_size, kv_heads, head_dim]` slice for one layer, so concatenating a block's
layer slices along a new leading dim gives the Full Block without any relayout.
"""

from __future__ import annotations

import torch

from engine.config import ModelConfig


class KVCache:
    def __init__(
        self,
        model: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
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

    @property
    def full_block_shape(self) -> tuple[int, ...]:
        layers, two, _, bs, kvh, hd = self.tensor.shape
        return (layers, two, bs, kvh, hd)

    def layer_views(self) -> list[torch.Tensor]:
        """Per layer `[2, num_blocks, block_size, kv_heads, head_dim]` views (no copy)."""
        return list(self.tensor.unbind(0))

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

    def import_layer(self, layer: int, block_ids: list[int], data: torch.Tensor) -> None:
        """Write one layer's Layer Blocks `[n, 2, block_size, kv_heads, head_dim]`."""
        expected = (len(block_ids), *self.full_block_shape[1:])
        if tuple(data.shape) != expected:
            raise ValueError(f"layer KV of shape {tuple(data.shape)}, expected {expected}")
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.tensor.device)
        src = data.to(self.tensor.device, self.tensor.dtype).transpose(0, 1)
        self.tensor[layer].index_copy_(1, idx, src)
