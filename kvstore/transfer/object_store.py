"""KV transfer over the Ray object store: one object per layer.

Objects are owned by the sender's worker and borrowed by whoever holds the descriptor, so
Ray frees them once the last descriptor copy is gone; `release` drops this side's refs.
Same-node reads are zero-copy (numpy buffers straight from shared memory).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import ray
import torch

from kvstore.transfer.base import KVDescriptor


class ObjectStoreTransport:
    name = "object_store"

    def send(self, transfer_id: str, layers: Sequence[torch.Tensor]) -> KVDescriptor:
        if not layers:
            raise ValueError("nothing to send")
        # NOTE: numpy has no bfloat16; 16-bit floats travel as int16 and are viewed back.
        refs = [ray.put(_as_numpy(layer)) for layer in layers]
        first = layers[0]
        return KVDescriptor(
            transport=self.name,
            transfer_id=transfer_id,
            num_layers=len(layers),
            layer_shape=tuple(first.shape),
            dtype=str(first.dtype).removeprefix("torch."),
            payload=refs,
        )

    def recv(self, descriptor: KVDescriptor) -> Iterator[torch.Tensor]:
        for ref in descriptor.payload:
            array: np.ndarray = ray.get(ref)
            with warnings.catch_warnings():
                # NOTE: shared-memory buffers are read-only; we only ever copy out of them.
                warnings.simplefilter("ignore", UserWarning)
                tensor = torch.from_numpy(array)
            yield tensor.view(getattr(torch, descriptor.dtype))

    def release(self, descriptor: KVDescriptor) -> None:
        return None  # refs die with the last descriptor copy

    def close(self) -> None:
        return None


def _as_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().contiguous().cpu()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.view(torch.int16)
    return tensor.numpy()
