"""Mixture-of-experts decoder: Llama-family attention + DeepSeek-style MoE feed-forward.

Checkpoint layout is Qwen2-MoE's (`Qwen2MoeForCausalLM`): per layer `mlp.gate.weight`
(router), `mlp.experts.{e}.{gate,up,down}_proj.weight` (or transformers-5 fused
`mlp.experts.gate_up_proj` / `down_proj`), `mlp.shared_expert.*` + `mlp.shared_expert_gate`,
and dense `mlp.*` on `mlp_only_layers`. The routing options are DeepSeek-V2/V3's config keys
on top (`scoring_func`, `n_group` / `topk_group`, `topk_method: noaux_tc` with
`mlp.gate.e_score_correction_bias`, `routed_scaling_factor`, `norm_topk_prob`,
`n_shared_experts` -> ungated `mlp.shared_experts.*`, `first_k_dense_replace`). DeepSeek's
MLA attention is not implemented, so real DeepSeek-V2/V3 checkpoints do not load.

The block's math is engine/kernels/moe.py; the experts run through the kernel dispatch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.kernels import ops
from engine.kernels.moe import RouterSpec, select_experts
from engine.layers.linear import Linear
from engine.models.llama import LlamaForCausalLM, LlamaMLP


class Router(nn.Module):
    """Router logits x @ W^T in float32, plus DeepSeek-V3's optional correction bias."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.num_experts is not None
        self.weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))
        self.e_score_correction_bias = (
            nn.Parameter(torch.zeros(cfg.num_experts)) if cfg.topk_method == "noaux_tc" else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


class Experts(nn.Module):
    """All routed experts' weights, stacked: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(
            torch.zeros(num_experts, 2 * intermediate_size, hidden_size)
        )
        self.down_proj = nn.Parameter(torch.zeros(num_experts, hidden_size, intermediate_size))


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.num_experts is None or cfg.moe_intermediate_size is None:
            raise ValueError("a MoE layer needs num_experts and moe_intermediate_size")
        self.spec = RouterSpec(
            top_k=cfg.num_experts_per_tok,
            scoring=cfg.scoring_func,
            num_groups=cfg.n_group or 1,
            topk_groups=cfg.topk_group or 1,
            norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor,
        )
        self.gate = Router(cfg)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_expert: LlamaMLP | None = None
        self.shared_expert_gate: Linear | None = None
        self.shared_experts: LlamaMLP | None = None
        if cfg.shared_expert_intermediate_size:  # Qwen2-MoE: one expert, sigmoid-gated
            self.shared_expert = LlamaMLP(cfg, cfg.shared_expert_intermediate_size)
            self.shared_expert_gate = Linear(cfg.hidden_size, 1, bias=False)
        elif cfg.n_shared_experts:  # DeepSeek: n experts fused into one MLP, ungated
            self.shared_experts = LlamaMLP(cfg, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, expert_ids = select_experts(
            self.gate(x), self.spec, self.gate.e_score_correction_bias
        )
        out = ops.fused_moe(
            x, self.experts.gate_up_proj, self.experts.down_proj, weights, expert_ids
        )
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        elif self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


class MoeForCausalLM(LlamaForCausalLM):
    """Llama-family decoder whose MoE layers (`ModelConfig.is_moe_layer`) use SparseMoeBlock."""

    def build_mlp(self, cfg: ModelConfig, layer_idx: int) -> nn.Module:
        if cfg.is_moe_layer[layer_idx]:
            return SparseMoeBlock(cfg)
        return LlamaMLP(cfg)
