"""KVCache export/import: Full Blocks, Layer Blocks and their layout relation."""

from __future__ import annotations

import pytest
import torch

from engine.config import ModelConfig
from engine.kv_cache import KVCache

TOY = ModelConfig(
    hidden_size=8,
    intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    vocab_size=10,
)


def _filled_cache() -> KVCache:
    cache = KVCache(TOY, num_blocks=5, block_size=4, dtype=torch.float32)
    cache.tensor.copy_(torch.randn_like(cache.tensor))
    return cache


def test_full_block_roundtrip_into_other_block_ids():
    src, dst = _filled_cache(), KVCache(TOY, 5, 4, torch.float32)
    data = src.export_blocks([3, 1])
    assert data.shape == (2, 3, 2, 4, 1, 4)
    dst.import_blocks([0, 2], data)
    assert torch.equal(dst.tensor[:, :, 0], src.tensor[:, :, 3])
    assert torch.equal(dst.tensor[:, :, 2], src.tensor[:, :, 1])
    assert dst.tensor[:, :, [1, 3, 4]].abs().sum() == 0


def test_layer_blocks_stack_into_the_full_block():
    """Concatenating a block's Layer Blocks gives its Full Block with no relayout."""
    cache = _filled_cache()
    full = cache.export_blocks([2, 4])
    layers = torch.stack([cache.export_layer(layer, [2, 4]) for layer in range(3)], dim=1)
    assert torch.equal(layers, full)


def test_layer_import_writes_only_that_layer():
    src, dst = _filled_cache(), KVCache(TOY, 5, 4, torch.float32)
    dst.import_layer(1, [4], src.export_layer(1, [0]))
    assert torch.equal(dst.tensor[1, :, 4], src.tensor[1, :, 0])
    assert dst.tensor[0].abs().sum() == 0 and dst.tensor[2].abs().sum() == 0


def test_import_rejects_wrong_shapes():
    cache = _filled_cache()
    with pytest.raises(ValueError):
        cache.import_blocks([0], torch.zeros(2, 3, 2, 4, 1, 4))
    with pytest.raises(ValueError):
        cache.import_layer(0, [0], torch.zeros(1, 2, 8, 1, 4))
