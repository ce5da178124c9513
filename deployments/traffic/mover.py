"""KVMover: every KV transfer between engines goes through one, in each engine process.

It splits a request's KV into layers, hands them to the configured transport (NIXL, or the
Ray object store), falls back to the object store when NIXL has no staging room, keeps a
held transfer's lease alive until the receiver reads it, and counts what moved (the
engine reports the counters to its node's TrafficManager). Engine-to-engine KV moves go
over their own transport, never through a node's SNIC.
"""

from __future__ import annotations

import logging
import threading
import time

import torch

from deployments.protocol import TransferStats
from engine.output import SequenceKV
from kvstore.transfer.base import KVDescriptor, KVTransport

logger = logging.getLogger(__name__)


class KVMover:
    def __init__(
        self,
        transport: KVTransport,
        stats: TransferStats,
        fallback: KVTransport | None = None,
    ):
        self.transport = transport
        self.fallback = fallback
        self.stats = stats
        self._by_name = {t.name: t for t in (fallback, transport) if t is not None}
        self._held: dict[str, KVDescriptor] = {}  # waiting to be received: leases renewed
        self._held_lock = threading.Lock()
        self._renewer: threading.Thread | None = None

    def hold(self, descriptor: KVDescriptor) -> None:
        """Keep the sender's lease on `descriptor` alive until `receive` starts (the DE is
        waiting for a receive thread). A no-op for transports without leases."""
        if not hasattr(self._by_name.get(descriptor.transport), "renew"):
            return
        with self._held_lock:
            self._held[descriptor.transfer_id] = descriptor
            if self._renewer is None:
                self._renewer = threading.Thread(target=self._renew_held, daemon=True)
                self._renewer.start()

    def release(self, descriptor: KVDescriptor) -> None:
        """Tell the sender it may free the transfer now (a receiver that gave up on it)."""
        transport = self._by_name.get(descriptor.transport)
        if transport is not None:
            transport.release(descriptor)

    def unhold(self, descriptor: KVDescriptor) -> None:
        with self._held_lock:
            self._held.pop(descriptor.transfer_id, None)

    def _renew_held(self) -> None:
        """Renew every held lease once half of it is gone; a lease already too short to
        renew safely is dropped (its receive fails and the DE recomputes)."""
        while True:
            with self._held_lock:
                held = list(self._held.values())
                if not held:
                    self._renewer = None
                    return
            for descriptor in held:
                transport = self._by_name[descriptor.transport]
                lease_s = descriptor.payload.lease_s
                try:
                    if transport.lease_left_s(descriptor) < lease_s / 2:  # type: ignore[attr-defined]
                        transport.renew(descriptor)  # type: ignore[attr-defined]
                except Exception as exc:
                    logger.warning("lease of %s lost (%s)", descriptor.transfer_id, exc)
                    self.unhold(descriptor)
            time.sleep(min(d.payload.lease_s for d in held) / 8)

    def send(self, transfer_id: str, kv: SequenceKV) -> KVDescriptor:
        """Hand `kv` to the transport layer by layer; returns what the receiver needs."""
        start = time.perf_counter()
        layers = [kv.data[:, layer] for layer in range(kv.data.shape[1])]
        try:
            descriptor = self.transport.send(transfer_id, layers)
        except Exception as exc:
            if self.fallback is None or self.fallback is self.transport:
                raise
            # NOTE: e.g. the NIXL staging pool is full: slower path, same bytes.
            logger.warning(
                "KV transport %s failed (%s); using %s",
                self.transport.name,
                exc,
                self.fallback.name,
            )
            self.stats.num_fallbacks += 1
            descriptor = self.fallback.send(transfer_id, layers)
        self.stats.add(descriptor, time.perf_counter() - start, sent=True)
        return descriptor

    def receive(self, descriptor: KVDescriptor) -> torch.Tensor:
        """All layers of a transfer as one `[blocks, layers, 2, block, heads, dim]` tensor."""
        start = time.perf_counter()
        self.unhold(descriptor)  # from here recv renews the lease itself, between layers
        transport = self._by_name.get(descriptor.transport)
        if transport is None:
            raise RuntimeError(f"this engine has no {descriptor.transport!r} KV transport")
        blocks, *rest = descriptor.layer_shape
        dtype = getattr(torch, descriptor.dtype)
        data = torch.empty((blocks, descriptor.num_layers, *rest), dtype=dtype)
        num_layers = 0
        try:
            for layer, tensor in enumerate(transport.recv(descriptor)):
                data[:, layer].copy_(tensor)
                num_layers += 1
        finally:
            transport.release(descriptor)
        if num_layers != descriptor.num_layers:
            raise RuntimeError(
                f"KV transfer {descriptor.transfer_id} ended after {num_layers} "
                f"of {descriptor.num_layers} layers"
            )
        self.stats.add(descriptor, time.perf_counter() - start, sent=False)
        return data

    def close(self) -> None:
        for transport in self._by_name.values():
            transport.close()
