"""Tier 1's storage: KV blocks as Ray objects in the node's shared-memory object store.

`put_block` runs in the node's TrafficManager, so that long-lived actor owns every DRAM
block (they outlive the engine that wrote them). Readers on the same node map them
zero-copy (`fetch_blocks`): numpy buffers straight from shared memory, viewed as tensors.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import torch

# NOTE: numpy has no bfloat16; 16-bit floats are stored as int16 and viewed back.
_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16}


def block_to_object(block: torch.Tensor) -> tuple[str, np.ndarray]:
    """(dtype name, numpy array): what Ray stores and ships without pickling tensor data."""
    tensor = block.detach().contiguous().cpu()
    dtype = str(tensor.dtype).removeprefix("torch.")
    return dtype, tensor.view(_BITS.get(tensor.dtype, tensor.dtype)).numpy()


def put_block(block: torch.Tensor) -> ray.ObjectRef:
    return ray.put(block_to_object(block))


def block_from_object(value: tuple[str, np.ndarray]) -> torch.Tensor:
    dtype, array = value
    with warnings.catch_warnings():
        # NOTE: shared-memory buffers are read-only; engines only ever copy out of them.
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(array)
    return tensor.view(getattr(torch, dtype))


def get_block(ref: ray.ObjectRef) -> torch.Tensor:
    return block_from_object(ray.get(ref))


async def fetch_blocks(refs: Sequence[Any]) -> list[torch.Tensor]:
    """All blocks of `refs`, in order (zero-copy on the owner's node)."""
    if not refs:
        return []
    values = await asyncio.gather(*refs)
    return [block_from_object(v) for v in values]
