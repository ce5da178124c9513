"""Engine configuration: the validated knobs of one engine, and the model's own config.

`EngineConfig` is what callers pass; `ModelConfig` is read from the model directory's
`config.json`. Derived sizes (KV bytes per block, number of blocks) are computed once, here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
MODEL_CACHE_ENV = "DUALPATH_MODEL_CACHE"

DType = Literal["float32", "bfloat16", "float16"]
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_cache_dir() -> Path:
    """Directory holding converted models (`$DUALPATH_MODEL_CACHE`, else ~/.cache/...)."""
    env = os.environ.get(MODEL_CACHE_ENV)
    base = Path(env) if env else Path.home() / ".cache" / "dualpath-serve" / "models"
    return base.expanduser()


def default_model_dir() -> Path:
    return model_cache_dir() / DEFAULT_MODEL_NAME


class RopeScaling(BaseModel):
    model_config = ConfigDict(extra="allow")
    rope_type: str = Field(default="default", validation_alias="type")
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    @model_validator(mode="before")
    @classmethod
    def _accept_both_keys(cls, data: dict) -> dict:
        if isinstance(data, dict) and "rope_type" in data and "type" not in data:
            data = {**data, "type": data["rope_type"]}
        return data


class ModelConfig(BaseModel):
    """The subset of a Hugging Face Llama-family `config.json` the engine needs."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    architectures: list[str] = Field(default_factory=lambda: ["LlamaForCausalLM"])
    model_type: str = "llama"
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @property
    def num_kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        # Qwen2 always carries q/k/v biases; Llama only when attention_bias is set.
        return self.attention_bias or self.model_type == "qwen2"

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else self.eos_token_id

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: point the engine at a Hugging Face model directory, "
                "or run `python -m ops model fetch` for the default model"
            )
        data = json.loads(path.read_text())
        if "rope_theta" not in data and isinstance(data.get("rope_parameters"), dict):
            data["rope_theta"] = data["rope_parameters"].get("rope_theta", 10000.0)
        return cls.model_validate(data)


class EngineConfig(BaseModel):
    """Knobs of one engine (one accelerator, or a CPU slice)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Path = Field(default_factory=default_model_dir, description="HF-style model dir")
    dtype: DType = Field(default="float32", description="weights + KV dtype")
    device: str = Field(default="cpu", description="'cpu' or 'cuda[:N]'")
    block_size: int = Field(default=64, ge=1, description="tokens per KV block")
    kv_cache_bytes: int = Field(default=1 << 30, gt=0, description="KV pool size in bytes")
    num_kv_blocks: int | None = Field(default=None, gt=0, description="overrides kv_cache_bytes")
    max_num_seqs: int = Field(default=64, ge=1, description="sequences per batch")
    max_num_batched_tokens: int = Field(default=2048, ge=1, description="token budget per step")
    max_model_len: int | None = Field(default=None, ge=1, description="cap on prompt+output")
    prefill_quota_s: float | None = Field(
        default=None, gt=0, description="predicted prefill time per step (None: tokens only)"
    )
    enable_prefix_caching: bool = True
    cpu_linear_backend: Literal["auto", "onednn", "torch"] = Field(
        default="auto", description="CPU matmuls: oneDNN prepacked weights (auto) or F.linear"
    )
    num_threads: int | None = Field(default=None, ge=1, description="torch CPU threads")
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.dtype]

    def kv_bytes_per_block(self, model: ModelConfig) -> int:
        itemsize = torch.empty((), dtype=self.torch_dtype).element_size()
        per_token = model.num_hidden_layers * 2 * model.num_kv_heads * model.head_size
        return per_token * self.block_size * itemsize

    def resolve_num_blocks(self, model: ModelConfig) -> int:
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        return max(1, self.kv_cache_bytes // self.kv_bytes_per_block(model))

    def resolve_max_model_len(self, model: ModelConfig) -> int:
        return min(
            self.max_model_len or model.max_position_embeddings, model.max_position_embeddings
        )
