"""Engine-to-engine KV transfer: one protocol (`base.KVTransport`), two transports.

- `object_store` [ray]: each layer is a Ray object; always available.
- `nixl`: UCX/RDMA through NIXL (DRAM→DRAM on CPU, GPU memory on GPUs); import-guarded.

`create_transport(name)` picks one: "auto" means NIXL when the package imports, else the
object store.
"""

from __future__ import annotations

from kvstore.transfer.base import KVDescriptor, KVTransport, TransportName, create_transport

__all__ = ["KVDescriptor", "KVTransport", "TransportName", "create_transport"]
