from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (as the reference implementations do).

    The output has the input's dtype unless `out_dtype` is set: an engine running bf16
    matmuls keeps its residual stream and norm weights in float32 and sets `out_dtype` to
    bf16, so the norm is also the cast into the next matmul.
    """

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.out_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = self.out_dtype or x.dtype
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            # one fused op; bit-identical to the path below for float32
            y = F.rms_norm(x, self.weight.shape, self.weight, self.eps)
            return y if out_dtype == torch.float32 else y.to(out_dtype)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x.to(dtype)).to(out_dtype)
