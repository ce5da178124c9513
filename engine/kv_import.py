"""Stored KV into the cache: a prompt's leading blocks, copied in one layer at a time.

A request admitted with a `PrefixKV` (hit blocks read from the KV store, or forwarded from
the decode side's DRAM buffer) skips computing those blocks. Their copy into the cache runs
on a helper thread, layer by layer, while the step's forward computes: before layer i the
forward waits only for layer i's copy, so layer i+1's KV moves while layer i computes (the
paper's layer-wise prefill; on a GPU the copy is the H2D transfer).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from engine.kv_cache import KVCache


@dataclass(slots=True)
class PrefixKV:
    """Stored KV of a prompt's leading full blocks. Each block is a Full Block
    `[layers, 2, block_size, kv_heads, head_dim]`; read-only views are fine (they are copied).
    """

    block_keys: list[bytes]
    blocks: list[torch.Tensor]

    def __post_init__(self) -> None:
        if len(self.block_keys) != len(self.blocks):
            raise ValueError("PrefixKV needs one key per block")

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)


@dataclass(slots=True)
class ImportStats:
    num_blocks: int = 0
    copy_s: float = 0.0  # time the helper thread spent copying
    wait_s: float = 0.0  # time the forward stood still waiting for a layer

    def add(self, other: ImportStats) -> None:
        self.num_blocks += other.num_blocks
        self.copy_s += other.copy_s
        self.wait_s += other.wait_s

    @property
    def overlap(self) -> float:
        """Fraction of the copy hidden behind compute (1.0 = fully overlapped)."""
        return 1.0 - min(1.0, self.wait_s / self.copy_s) if self.copy_s > 0 else 1.0


class LayerwiseImport:
    """Copy `(cache block id, Full Block)` pairs into `kv_cache`, layer 0 first."""

    def __init__(self, kv_cache: KVCache, blocks: list[tuple[int, torch.Tensor]]):
        self.cache = kv_cache.tensor
        self.blocks = blocks
        self.num_layers = self.cache.shape[0]
        self.stats = ImportStats(num_blocks=len(blocks))
        self._done = 0  # layers fully copied
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="kv-import", daemon=True)

    def start(self) -> LayerwiseImport:
        self._thread.start()
        return self

    def wait(self, layer: int) -> None:
        """Block until `layer`'s KV is in the cache (called by the forward before layer i)."""
        start = time.perf_counter()
        with self._cond:
            self._cond.wait_for(lambda: self._done > layer or self._error is not None)
        self.stats.wait_s += time.perf_counter() - start
        if self._error is not None:
            raise RuntimeError("stored KV import failed") from self._error

    def join(self) -> None:
        self.wait(self.num_layers - 1)
        self._thread.join()

    def _run(self) -> None:
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                for layer in range(self.num_layers):
                    dst = self.cache[layer]  # [2, num_blocks, block_size, heads, dim]
                    for block_id, block in self.blocks:
                        dst[:, block_id].copy_(block[layer])
                    with self._cond:
                        self._done = layer + 1
                        self._cond.notify_all()
        except BaseException as exc:  # surfaced to the forward by wait()
            with self._cond:
                self._error = exc
                self._cond.notify_all()
        finally:
            self.stats.copy_s = time.perf_counter() - start
