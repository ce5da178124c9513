"""KVTransport: how one engine's KV layers reach another engine.

The sender (prefill side) calls `send` with a request's KV split per layer; it returns a small
picklable `KVDescriptor` that travels with the request (through Serve handles) to the
receiver (decode side), which calls `recv` to get the layers back, in order, then `release`
so the sender may reuse whatever memory held them.

NOTE: layers are separate units on purpose: a later layer-wise prefill hands layer i over
while it computes layer i+1, and the receiver may import layer i as soon as it arrives.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

TransportName = Literal["auto", "nixl", "object_store"]


@dataclass(frozen=True, slots=True)
class KVDescriptor:
    """Where a request's KV layers wait for the receiver. Small; pickled across processes.

    `layer_shape` is the shape of one layer's tensor (`[num_blocks, 2, block_size, kv_heads,
    head_dim]`), `payload` is transport specific (object refs, remote addresses, ...).
    """

    transport: str
    transfer_id: str
    num_layers: int
    layer_shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "float32"
    payload: Any = field(repr=False)

    @property
    def num_bytes(self) -> int:
        n = 1
        for d in self.layer_shape:
            n *= d
        return (
            n * self.num_layers * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()
        )


class KVTransport(Protocol):
    """One endpoint (an engine process) of KV transfer. Both roles on every endpoint.

    Contract:
      - `send` copies the data out (the caller may reuse its tensors when it returns) and
        keeps it readable until `release(descriptor)` or the transport's own expiry.
      - `recv` yields exactly `num_layers` tensors of `layer_shape`/`dtype`, layer 0 first;
        a yielded tensor is valid until the next one is requested.
      - `release` is idempotent and safe from the receiver's process.
    """

    name: str

    def send(self, transfer_id: str, layers: Sequence[torch.Tensor]) -> KVDescriptor: ...

    def recv(self, descriptor: KVDescriptor) -> Iterator[torch.Tensor]: ...

    def release(self, descriptor: KVDescriptor) -> None: ...

    def close(self) -> None: ...


def nixl_available() -> bool:
    return importlib.util.find_spec("nixl") is not None


def create_transport(name: TransportName = "auto", **kwargs: Any) -> KVTransport:
    """Build this process's transport endpoint; "auto" prefers NIXL when installed."""
    if name == "auto":
        name = "nixl" if nixl_available() else "object_store"
    if name == "nixl":
        from kvstore.transfer.nixl import NixlTransport

        return NixlTransport(**kwargs)
    if name == "object_store":
        from kvstore.transfer.object_store import ObjectStoreTransport

        return ObjectStoreTransport()
    raise ValueError(f"unknown KV transport {name!r} (auto, nixl, object_store)")
