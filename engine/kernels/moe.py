"""DeepSeek-style mixture of experts: router, routed SwiGLU experts, shared experts.

The torch reference, and so the spec, of what the fused MoE kernel computes.

Router (`select_experts`), per token, on float32 router logits `x @ W_r^T` [T, E]:
1. scores = softmax(logits) (Qwen2-MoE, DeepSeek-V2) or sigmoid(logits) (DeepSeek-V3).
2. choice = scores + correction_bias (DeepSeek-V3's aux-loss-free balancing bias: it only
   steers *which* experts win, never their weights).
3. Group-limited routing (num_groups > 1): experts form `num_groups` equal groups; a group's
   score is its best expert (softmax scoring) or the sum of its best two (sigmoid scoring,
   as V3); only the `topk_groups` best groups stay eligible.
4. The top_k eligible experts by choice; their weights are the unbiased scores, divided by
   their sum when `norm_topk_prob`, then multiplied by `routed_scaling_factor`.

Experts: y_e(x) = W2_e (silu(G_e x) * U_e x), with [G_e; U_e] stored fused as `w13[e]`.
Routed output: sum over the token's k choices of weight * y_e(x). The reference computes it
the way a fused kernel does: permute the (token, choice) pairs so each expert's tokens are
contiguous, one GEMM pair per expert over its rows, scale by the weights, un-permute with an
index_add. Shared experts: one SwiGLU MLP on every token, optionally gated by
sigmoid(x . w_g) (Qwen2-MoE).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Scoring = Literal["softmax", "sigmoid"]


@dataclass(frozen=True, slots=True)
class RouterSpec:
    """How a token picks its experts (see the module docstring)."""

    top_k: int
    scoring: Scoring = "softmax"
    num_groups: int = 1
    topk_groups: int = 1
    norm_topk_prob: bool = False
    routed_scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.top_k < 1 or self.num_groups < 1 or not 1 <= self.topk_groups <= self.num_groups:
            raise ValueError(f"invalid router spec {self}")


def select_experts(
    router_logits: torch.Tensor, spec: RouterSpec, correction_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing weights [T, k] (float32) and expert ids [T, k] (long) from logits [T, E]."""
    logits = router_logits.float()
    num_tokens, num_experts = logits.shape
    if spec.top_k > num_experts:
        raise ValueError(f"top_k {spec.top_k} > {num_experts} experts")
    scores = logits.softmax(dim=-1) if spec.scoring == "softmax" else logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias.float()
    if spec.num_groups > 1:
        if num_experts % spec.num_groups:
            raise ValueError(f"{num_experts} experts do not split into {spec.num_groups} groups")
        grouped = choice.view(num_tokens, spec.num_groups, -1)
        if spec.scoring == "sigmoid":
            group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        else:
            group_scores = grouped.amax(dim=-1)
        keep = group_scores.topk(spec.topk_groups, dim=-1).indices
        group_ok = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        eligible = group_ok[:, :, None].expand_as(grouped).reshape(num_tokens, num_experts)
        choice = choice.masked_fill(~eligible, float("-inf"))
    expert_ids = choice.topk(spec.top_k, dim=-1).indices
    weights = scores.gather(1, expert_ids)
    if spec.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * spec.routed_scaling_factor, expert_ids


def swiglu(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """One SwiGLU MLP: x [T, H], w13 [2I, H] (gate rows then up rows), w2 [H, I]."""
    gate, up = F.linear(x, w13).chunk(2, dim=-1)
    return F.linear(F.silu(gate) * up, w2)


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Routed experts' output [T, H] for x [T, H] (permute, per-expert GEMMs, un-permute).

    Args:
        w13: [E, 2I, H] fused gate/up weights; w2: [E, H, I] down weights.
        topk_weights: [T, k] routing weights; topk_ids: [T, k] expert ids.
    """
    num_tokens, hidden = x.shape
    num_experts = w13.shape[0]
    k = topk_ids.shape[1]
    flat_ids = topk_ids.reshape(-1)
    order = flat_ids.argsort(stable=True)  # (token, choice) pairs grouped by expert
    token_of = order // k
    counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
    rows = x.index_select(0, token_of)
    out_rows = torch.empty_like(rows)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            seg = slice(start, start + count)
            out_rows[seg] = swiglu(rows[seg], w13[expert], w2[expert])
            start += count
    out_rows *= topk_weights.reshape(-1)[order].to(x.dtype)[:, None]
    return torch.zeros(num_tokens, hidden, dtype=x.dtype, device=x.device).index_add_(
        0, token_of, out_rows
    )


def moe_layer(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    spec: RouterSpec,
    correction_bias: torch.Tensor | None = None,
    shared: tuple[torch.Tensor, torch.Tensor] | None = None,
    shared_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """A whole MoE block on x [T, H]: route, routed experts, plus (gated) shared experts.

    Args:
        router_weight: [E, H]; shared: (w13 [2I_s, H], w2 [H, I_s]) of the shared experts
            fused into one MLP; shared_gate: [1, H] sigmoid gate on the shared output.
    """
    logits = F.linear(x.float(), router_weight.float())
    weights, ids = select_experts(logits, spec, correction_bias)
    out = fused_moe(x, w13, w2, weights, ids)
    if shared is not None:
        shared_out = swiglu(x, *shared)
        if shared_gate is not None:
            shared_out = torch.sigmoid(F.linear(x, shared_gate)) * shared_out
        out = out + shared_out
    return out
