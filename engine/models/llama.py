"""Llama-family decoder (Llama, SmolLM2, Qwen2, Mistral-style) over the paged KV cache.

Fused projections (qkv, gate_up) cut the number of kernel launches per layer; the loader
concatenates the checkpoint's separate matrices into them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import ModelConfig
from engine.forward_context import ForwardContext
from engine.layers.attention import paged_attention
from engine.layers.linear import Linear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_size
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=False)
        self.rotary = rotary

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        qkv = self.qkv_proj(x).view(-1, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        # q and k heads are contiguous in the fused output: rotate them in one call
        qk = self.rotary(ctx.rope, qkv[:, : self.num_heads + self.num_kv_heads])
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = qkv[:, self.num_heads + self.num_kv_heads :]
        out = paged_attention(q, k, v, kv_cache, ctx.attn, self.scale, ctx.sparse, self.layer_idx)
        return self.o_proj(out)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        self.intermediate_size = intermediate_size or cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * self.intermediate_size, bias=False)
        self.down_proj = Linear(self.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        rotary: RotaryEmbedding,
        layer_idx: int = 0,
        mlp: nn.Module | None = None,
    ):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, rotary, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp if mlp is not None else LlamaMLP(cfg)

    def forward(self, x: torch.Tensor, kv_cache: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), kv_cache, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.config = cfg
        rotary = RotaryEmbedding(cfg.head_size, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.rotary = rotary
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, rotary, i, self.build_mlp(cfg, i))
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # float32 while the matmuls run bf16 (see `use_mixed_precision`); None: the weights'
        self.residual_dtype: torch.dtype | None = None
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def build_mlp(self, cfg: ModelConfig, layer_idx: int) -> nn.Module:
        """The feed-forward block of layer `layer_idx` (variants override this)."""
        return LlamaMLP(cfg)

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Hidden states [T, hidden] for a flat batch of tokens [T]."""
        x = self.embed_tokens(input_ids)
        if self.residual_dtype is not None:
            x = x.to(self.residual_dtype)
        ctx.rope = self.rotary.lookup(ctx.positions)
        for i, (layer, kv_cache) in enumerate(zip(self.layers, ctx.kv_caches, strict=True)):
            if ctx.before_layer is not None:
                ctx.before_layer(i)
            x = layer(x, kv_cache, ctx)
        return self.norm(x)

    def use_mixed_precision(self, matmul_dtype: torch.dtype) -> None:
        """Run the linears (and attention) in `matmul_dtype` but keep the residual stream,
        the norms and their weights in float32: summing 30 layers' outputs in bf16 is where
        low-precision decoding loses the most (the int4 model's greedy answers drift)."""
        self.residual_dtype = torch.float32
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.data = module.weight.data.float()
                module.out_dtype = matmul_dtype

    def prepack_linears(self) -> int:
        """Switch every Linear to its oneDNN prepacked weight; returns how many switched.

        The dense copies are released, except a tied lm_head (it is the embedding table).
        """
        tied = self.config.tie_word_embeddings
        return sum(
            m.prepack(release_dense=not (tied and m is self.lm_head))
            for m in self.modules()
            if isinstance(m, Linear)
        )

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    # Checkpoint name -> (our parameter, shard index within a fused parameter)
    fused_shards = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
