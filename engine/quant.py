"""Weight-only quantisation for CPU linears, on torch's own kernels (no new dependency).

Two formats, each with a torch kernel that has an AVX-512 path for **bfloat16** activations
(float32 activations fall to a scalar path ~25x slower, so activations are bf16 here):

- **int4, groupwise asymmetric** (`aten._weight_int4pack_mm_for_cpu`): per group of `g`
  input values, ``w = (q - 8) * scale + zero`` with ``q`` in 0..15. A GGUF Q4_1 block (32
  values, ``w = q * d + m``) is exactly this with ``g = 32``, ``scale = d``,
  ``zero = m + 8 * d``, so the default model's 4-bit codes load as they are (`from_q4_1`):
  the engine runs the weights llama.cpp runs. The kernel takes bf16 scales and zeros, so
  ``d`` and ``m + 8d`` (fp16 in the file) are rounded to bf16 once; the codes are exact.
- **int8, per output row, symmetric** (`aten._weight_int8pack_mm`): ``w = q * scale``.

`QuantWeight.mm` is the matmul; `dense()` is the same weight dequantised, for the rows where
a dense bf16 matmul is faster (prefill: see `engine/layers/linear.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

Quantization = Literal["none", "int8", "int4"]
Int4GroupSize = Literal[32, 64, 128, 256]  # what the int4 kernel accepts
INT4_GROUP_SIZES: tuple[int, ...] = get_args(Int4GroupSize)


@dataclass(frozen=True)
class Int4Codes:
    """Unpacked int4 weight: codes [N, K] in 0..15, scale and zero [N, K / group] float32."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int

    def dequantize(self) -> torch.Tensor:
        """[N, K] float32 ``(q - 8) * scale + zero``, with scale and zero as the kernel sees
        them (bf16)."""
        g = self.group_size
        scale = self.scale.to(torch.bfloat16).float().repeat_interleave(g, dim=1)
        zero = self.zero.to(torch.bfloat16).float().repeat_interleave(g, dim=1)
        return (self.codes.float() - 8) * scale + zero


def from_q4_1(qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> Int4Codes:
    """GGUF Q4_1 (codes [N, K], d and m [N, K/32]) as groupwise int4 with group 32."""
    d32, m32 = d.float(), m.float()
    return Int4Codes(qs.to(torch.uint8), d32, m32 + 8 * d32, 32)


def quantize_int4(w: torch.Tensor, group_size: int = 32) -> Int4Codes:
    """Round-to-nearest asymmetric groupwise int4 of a dense [N, K] weight (min/max per group)."""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size {group_size} not in {INT4_GROUP_SIZES}")
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the int4 group size {group_size}")
    groups = w.float().reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    mid = (lo + hi) / 2
    # NOTE: the kernel stores scale and zero in bf16; a zero far from 0 moves by up to half
    # its ulp, which can exceed a step. Widen the step by that slack, centre the grid and
    # round the step up, so [lo, hi] stays inside the 16 codes and every value is within
    # half a step of its code.
    slack = mid.abs() * 2**-8
    scale = ((hi - lo + 2 * slack) / 15).clamp_min(1e-8)
    scale = (scale * (1 + 2**-7)).to(torch.bfloat16).float()
    zero = (mid + scale / 2).to(torch.bfloat16).float()
    base = zero - 8 * scale  # the weight code 0 stands for
    codes = ((groups - base.unsqueeze(-1)) / scale.unsqueeze(-1)).round().clamp(0, 15)
    return Int4Codes(codes.reshape(n, k).to(torch.uint8), scale, zero, group_size)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 of a dense [N, K] weight: (codes int8 [N, K], scale [N])."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-8).to(torch.bfloat16).float()
    codes = (w / scale.unsqueeze(1)).round().clamp(-127, 127).to(torch.int8)
    return codes, scale


class QuantWeight:
    """A quantised [N, K] weight and its kernel; `mm(x [M, K] bf16) -> [M, N] bf16`."""

    kind: Quantization
    out_features: int
    in_features: int
    nbytes: int  # what one matmul reads of the weight

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dense(self) -> torch.Tensor:
        """The same weight as a dense [N, K] float32 tensor."""
        raise NotImplementedError


class Int4Weight(QuantWeight):
    kind: Quantization = "int4"

    def __init__(self, codes: Int4Codes):
        n, k = codes.codes.shape
        self.out_features, self.in_features = n, k
        self.group_size = codes.group_size
        self._codes = codes
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            codes.codes.to(torch.int32).contiguous(), 1
        )
        # [K / g, N, 2]: (scale, zero) per group and output row
        self.scales_zeros = (
            torch.stack([codes.scale.t(), codes.zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        )
        self.nbytes = self.packed.numel() + self.scales_zeros.numel() * 2

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.packed, self.group_size, self.scales_zeros
        )

    def dense(self) -> torch.Tensor:
        return self._codes.dequantize()


class Int8Weight(QuantWeight):
    kind: Quantization = "int8"

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor):
        self.out_features, self.in_features = codes.shape
        self.codes = codes.contiguous()
        self.scale = scale.to(torch.bfloat16).contiguous()
        self.nbytes = self.codes.numel() + self.scale.numel() * 2

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.codes, self.scale)

    def dense(self) -> torch.Tensor:
        return self.codes.float() * self.scale.float().unsqueeze(1)


def quantize_weight(w: torch.Tensor, kind: Quantization, group_size: int = 32) -> QuantWeight:
    """Quantise a dense [N, K] weight with round-to-nearest (HF safetensors models)."""
    if kind == "int4":
        return Int4Weight(quantize_int4(w, group_size))
    if kind == "int8":
        return Int8Weight(*quantize_int8(w))
    raise ValueError(f"not a quantisation: {kind!r}")


def cpu_kernels_available() -> bool:
    """Whether this torch has the CPU weight-only kernels used here."""
    aten = torch.ops.aten
    return all(
        hasattr(aten, op)
        for op in (
            "_convert_weight_to_int4pack_for_cpu",
            "_weight_int4pack_mm_for_cpu",
            "_weight_int8pack_mm",
        )
    )
