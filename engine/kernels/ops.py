"""Kernel dispatch: the compiled CUDA extension (`engine/kernels/csrc`, built by
`engine/kernels/build.py`) or the torch reference (sparse_attention.py, moe.py).

The backend is `reference` unless `$DUALPATH_KERNELS` (or a call's `backend=`) asks for
`cuda` (the extension, an error where it cannot load) or `auto` (the extension for CUDA
tensors where it loads, else the reference).

NOTE: the default stays `reference` until the CUDA kernels have passed
tests/engine/test_kernels_gpu_ext.py on a GPU: they compile here (CI checks that) but no GPU
has been lent to this project yet, so they have never run. The reference runs on CPU and
CUDA tensors alike, so an engine never fails for lack of kernels.
"""

from __future__ import annotations

import functools
import logging
from types import ModuleType
from typing import Literal

import torch

from engine import env
from engine.kernels import moe as moe_ref
from engine.kernels import sparse_attention as sparse_ref
from engine.kernels.sparse_attention import SparseSpec

Backend = Literal["auto", "reference", "cuda"]
log = logging.getLogger(__name__)


def default_backend() -> Backend:
    value = env.kernel_backend()
    if value not in ("auto", "reference", "cuda"):
        raise ValueError(f"${env.KERNELS}={value!r}: expected auto, reference or cuda")
    return value  # type: ignore[return-value]


@functools.cache
def cuda_extension() -> ModuleType | None:
    """The compiled kernels (built on first use, then cached), or None without CUDA."""
    from engine.kernels.build import load_extension

    return load_extension()


def _pick(backend: Backend | None, tensor: torch.Tensor, op: str) -> ModuleType | None:
    """The extension to call, or None for the reference."""
    backend = backend or default_backend()
    if backend == "reference":
        return None
    if backend == "auto":
        return cuda_extension() if tensor.is_cuda else None
    if not tensor.is_cuda:
        raise RuntimeError(f"{op}: backend='cuda' needs CUDA tensors")
    ext = cuda_extension()
    if ext is None:
        raise RuntimeError(f"{op}: backend='cuda' but the CUDA extension did not load")
    return ext


class _Extension:
    """`sparse_attention.Primitives` on the compiled extension (mode strings -> flags)."""

    def __init__(self, ext: ModuleType):
        self.ext = ext

    def block_mass(self, q, summaries, phys, num_full, mode, scale):  # type: ignore[no-untyped-def]
        return self.ext.block_mass(q, summaries, phys, num_full, mode == "minmax", scale)

    def sparse_paged_attention(self, *args):  # type: ignore[no-untyped-def]
        return self.ext.sparse_paged_attention(*args)

    # NOTE: no CUDA kernel for the sparq ranking yet; the reference runs on CUDA tensors.
    channel_mass = staticmethod(sparse_ref.channel_mass)


def sparse_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    summaries: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    fraction: float,
    spec: SparseSpec,
    scale: float,
    backend: Backend | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block scoring + top-k selection + paged attention over the selected blocks.

    See `sparse_attention.sparse_decode_attention`: (out, tokens read, summaries read).
    """
    ext = _pick(backend, q, "sparse_decode_attention")
    prims = _Extension(ext) if ext is not None else None
    return sparse_ref.sparse_decode_attention(
        q, kv_cache, summaries, block_tables, context_lens, fraction, spec, scale, prims
    )


def update_summaries(
    kv_cache: torch.Tensor,
    summaries: torch.Tensor,
    sub_block_ids: torch.Tensor,
    spec: SparseSpec,
    backend: Backend | None = None,
) -> None:
    """Recompute the summaries of the score blocks that just filled."""
    if sub_block_ids.numel() == 0 or spec.summary_width == 0:
        return
    ext = _pick(backend, kv_cache, "update_summaries")
    minmax = spec.summary == "minmax"
    if ext is not None:
        ext.update_summaries(kv_cache, summaries, sub_block_ids, minmax, spec.global_view)
    else:
        sparse_ref.update_summaries(
            kv_cache, summaries, sub_block_ids, spec.summary, spec.global_view
        )


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    backend: Backend | None = None,
) -> torch.Tensor:
    """Routed experts' SwiGLU output; see `moe.fused_moe`."""
    ext = _pick(backend, x, "fused_moe")
    fn = ext.fused_moe if ext is not None else moe_ref.fused_moe
    return fn(x, w13, w2, topk_weights, topk_ids)
