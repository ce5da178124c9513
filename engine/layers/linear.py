"""Linear layer with the CPU fast paths: oneDNN prepacked weights, and weight-only int4/int8.

Why oneDNN: on CPUs where MKL's sgemm takes a slow path (measured on the project's AMD EPYC
machines: 2x slower at batch 8, 1.6x at batch 32), oneDNN's JIT matmul over a weight
reordered once into its blocked layout is the fast path (the same ops torch.compile's CPU
backend emits). Numerics match F.linear to float32 rounding.

Why dispatch on rows: a weight-only kernel reads 4x (int4) fewer bytes than bf16, which is
what a decode step with few rows is bound by; with more rows the step is bound by compute,
and there oneDNN's bf16 matmul over the dequantised weight is faster (a 1536x576 weight:
int4 28 vs bf16 79 us at 1 row, even at 8, bf16 2x faster at 32). In the engine, where
weights stream from memory, the SmolLM2 decode step was fastest with the kernel up to 8 rows
(batch 8: 270 vs 240 tok/s; batch 32: dense 499 vs kernel 284). So a quantised Linear keeps
both, and `quant_max_rows` (engine.quant_max_rows) picks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.quant import QuantWeight


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_reorder_linear_weight"
    )


class Linear(nn.Linear):
    packed_weight: torch.Tensor | None
    quant: QuantWeight | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.packed_weight = None
        self.quant = None
        self.quant_max_rows = 0

    def prepack(self, batch_hint: int = 8, release_dense: bool = False) -> bool:
        """Reorder the weight for oneDNN (CPU, float32; bfloat16 where the CPU supports it).

        Args:
            batch_hint: expected rows per call (layout tuning only; any count works).
            release_dense: drop the dense weight afterwards (halves weight memory); leave it
                when the tensor is shared, e.g. a tied embedding.

        Returns:
            Whether the packed path is now used.
        """
        w = self.weight
        if w.device.type != "cpu" or w.dtype not in (torch.float32, torch.bfloat16):
            return False
        try:
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(w.detach(), batch_hint)
        except RuntimeError:  # e.g. bf16 on a CPU without avx512bw/avx_ne_convert
            return False
        if release_dense:
            self.weight = nn.Parameter(torch.empty(0, dtype=w.dtype), requires_grad=False)
        return True

    def set_quant(self, quant: QuantWeight, max_rows: int, dtype: torch.dtype) -> None:
        """Use `quant` for calls of at most `max_rows` rows; larger calls read its dense
        dequantised copy in `dtype` (so both paths compute with the same weight)."""
        if (quant.out_features, quant.in_features) != tuple(self.weight.shape):
            raise ValueError(
                f"quantised weight {quant.out_features}x{quant.in_features} "
                f"!= linear {tuple(self.weight.shape)}"
            )
        self.quant = quant
        self.quant_max_rows = max_rows
        with torch.no_grad():
            self.weight = nn.Parameter(quant.dense().to(dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None and x.shape[0] <= self.quant_max_rows:
            out = self.quant.mm(x)
            return out if self.bias is None else out + self.bias
        if self.packed_weight is not None:
            return torch.ops.mkldnn._linear_pointwise(
                x, self.packed_weight, self.bias, "none", [], ""
            )
        return F.linear(x, self.weight, self.bias)
