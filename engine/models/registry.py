"""Architecture name (config.json `architectures[0]`) -> model class."""

from __future__ import annotations

from torch import nn

from engine.models.llama import LlamaForCausalLM
from engine.models.moe import MoeForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2MoeForCausalLM": MoeForCausalLM,
}


def resolve_model_class(architectures: list[str]) -> type[nn.Module]:
    for name in architectures:
        if name in MODEL_REGISTRY:
            return MODEL_REGISTRY[name]
    raise ValueError(
        f"unsupported architecture {architectures}; supported: {sorted(MODEL_REGISTRY)}"
    )
