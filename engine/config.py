"""Engine configuration: the validated knobs of one engine, and the model's own config.

`EngineConfig` is what callers pass; `ModelConfig` is read from the model directory's
`config.json`. Derived sizes (KV bytes per block, number of blocks) are computed once, here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from engine import env
from engine.quant import Int4GroupSize, Quantization

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

DType = Literal["float32", "bfloat16", "float16"]
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_cache_dir() -> Path:
    """Directory holding converted models (`$DUALPATH_MODEL_CACHE`, else ~/.cache/...)."""
    base = env.model_cache_dir() or Path.home() / ".cache" / "dualpath-serve" / "models"
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
    # MoE (Qwen2-MoE and DeepSeek-V2/V3 key names; absent for dense models)
    num_experts: int | None = Field(
        default=None,
        validation_alias=AliasChoices("num_experts", "n_routed_experts", "num_local_experts"),
    )
    num_experts_per_tok: int = 1
    moe_intermediate_size: int | None = None
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: one gated shared expert
    n_shared_experts: int = 0  # DeepSeek: shared experts of moe_intermediate_size, ungated
    norm_topk_prob: bool = False
    scoring_func: Literal["softmax", "sigmoid"] = "softmax"
    topk_method: str = "greedy"  # "noaux_tc": DeepSeek-V3 score-correction bias per expert
    n_group: int | None = None
    topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = Field(default_factory=list)
    first_k_dense_replace: int = 0

    @property
    def is_moe_layer(self) -> list[bool]:
        """Per layer: MoE block (True) or dense MLP (False)."""
        if not self.num_experts:
            return [False] * self.num_hidden_layers
        return [
            i >= self.first_k_dense_replace
            and i not in self.mlp_only_layers
            and (i + 1) % self.decoder_sparse_step == 0
            for i in range(self.num_hidden_layers)
        ]

    @property
    def num_kv_heads(self) -> int:
        return self.num_key_value_heads or self.num_attention_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        # Qwen2 always carries q/k/v biases; Llama only when attention_bias is set.
        return self.attention_bias or self.model_type in ("qwen2", "qwen2_moe")

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


class SparseAttentionConfig(BaseModel):
    """Top-k block-sparse decode attention (engine/kernels/sparse_attention.py).

    Each layer reads at most `fraction * context` tokens per decode step: the sink blocks,
    the blocks of the recent window, and the best-ranked blocks. Budgets run linearly from
    `shallow_fraction` (layer 0) to `deep_fraction` (last layer) unless `layer_fractions`
    lists one per layer. Prefill stays dense.

    NOTE: the defaults are the best measured on SmolLM2-135M over pydoc text at 4k context
    (docs/BENCHMARKS.md, sparse attention): mean-key ranking of 16-token blocks at a flat
    0.17 token budget reads ~20% of the KV bytes, summaries included. Min/max (Quest) bounds
    ranked worse than means, the issue's seed slope (0.45 shallow -> 0.10 deep) worse than
    flat, and the mean-key/value global view did not help.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    summary: Literal["minmax", "mean", "sparq"] = Field(
        default="mean",
        description="how blocks are ranked: key min+max or mean per block, or `channels` "
        "channels of every key (SparQ-style)",
    )
    channels: int = Field(default=8, ge=1, description="sparq: key channels read per token")
    shallow_fraction: float = Field(default=0.17, gt=0, le=1, description="layer 0 budget")
    deep_fraction: float = Field(default=0.17, gt=0, le=1, description="last layer budget")
    layer_fractions: tuple[float, ...] | None = Field(
        default=None, description="explicit per-layer budgets (overrides shallow/deep)"
    )
    num_sink_tokens: int = Field(default=64, ge=0, description="leading tokens always read")
    window_tokens: int = Field(default=64, ge=1, description="recent tokens always read")
    score_block_size: int | None = Field(
        default=16, ge=1, description="tokens per ranked block (None: the KV block size)"
    )
    global_view: bool = Field(
        default=False,
        description="unselected blocks still attend as one entry each (mean key and value)",
    )

    @model_validator(mode="after")
    def _check_fractions(self) -> SparseAttentionConfig:
        if self.layer_fractions is not None and not all(0 < f <= 1 for f in self.layer_fractions):
            raise ValueError("layer_fractions must lie in (0, 1]")
        return self

    def fractions(self, num_layers: int) -> tuple[float, ...]:
        """The budget of each of `num_layers` layers."""
        if self.layer_fractions is not None:
            if len(self.layer_fractions) != num_layers:
                raise ValueError(
                    f"layer_fractions has {len(self.layer_fractions)} entries, "
                    f"the model {num_layers} layers"
                )
            return tuple(self.layer_fractions)
        if num_layers == 1:
            return (self.shallow_fraction,)
        step = (self.deep_fraction - self.shallow_fraction) / (num_layers - 1)
        return tuple(self.shallow_fraction + i * step for i in range(num_layers))


SpecMethod = Literal["off", "ngram", "suffix"]


class SpeculativeConfig(BaseModel):
    """Draft-free speculative decoding on decode engines (engine/spec)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: SpecMethod = Field(
        default="off",
        description="ngram: prompt lookup in the sequence's own tokens; suffix: suffix tree "
        "over the sequence and its tenant's recent outputs, adaptive draft length",
    )
    num_speculative_tokens: int = Field(
        default=6, ge=1, le=32, description="most tokens one sequence drafts per step"
    )
    prompt_lookup_min: int = Field(default=2, ge=1, description="ngram: shortest match")
    prompt_lookup_max: int = Field(default=5, ge=1, description="ngram: longest match")
    suffix_max_depth: int = Field(
        default=24, ge=2, description="suffix: longest pattern (and tree depth) matched"
    )
    suffix_max_spec_factor: float = Field(
        default=1.0, gt=0.0, description="suffix: draft at most factor x match length tokens"
    )
    suffix_max_spec_offset: float = Field(
        default=4.0, ge=0.0, description="suffix: plus this many tokens (a short match's draft)"
    )
    suffix_min_token_prob: float = Field(
        default=0.1, ge=0.0, le=1.0, description="suffix: stop a draft below this estimate"
    )
    suffix_cache_requests: int = Field(
        default=64, ge=0, description="suffix: recent outputs kept per tenant (0: none)"
    )
    adaptive: bool = Field(
        default=True,
        description="draft only what pays: measured step cost vs acceptance per sequence "
        "(False: always draft up to num_speculative_tokens)",
    )

    @model_validator(mode="after")
    def _check_lookup(self) -> SpeculativeConfig:
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError("prompt_lookup_min must not exceed prompt_lookup_max")
        return self


def check_speculation_attention(speculative: SpeculativeConfig, attention: str) -> None:
    """Drafts are verified in the dense decode path: refuse speculation with sparse
    attention (the engine config, and the app's engine section at load)."""
    if speculative.method != "off" and attention == "sparse":
        raise ValueError(
            "speculative decoding needs dense attention: drafts are verified in the dense "
            "decode path (not available with attention: sparse)"
        )


class EngineConfig(BaseModel):
    """Knobs of one engine (one accelerator, or a CPU slice)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: Path = Field(default_factory=default_model_dir, description="HF-style model dir")
    dtype: DType = Field(
        default="float32", description="activations and dense weights (and KV unless kv_dtype)"
    )
    quantization: Quantization = Field(
        default="none",
        description="weight-only linears on CPU: int4 (groupwise; a GGUF's Q4_1 codes as they "
        "are) or int8 (per row); needs dtype bfloat16",
    )
    quant_max_rows: int = Field(
        default=8,
        ge=0,
        description="quantised kernel for matmuls of at most this many tokens; larger ones "
        "(prefill, big decode batches) use the dense bf16 copy, which is faster there",
    )
    int4_group_size: Int4GroupSize = Field(
        default=32, description="group size when int4 quantises a dense checkpoint at load"
    )
    quant_head: bool = Field(
        default=False,
        description="quantise the LM head too (it stays bf16 by default: the logits)",
    )
    kv_dtype: DType | None = Field(default=None, description="KV cache dtype (None: dtype)")
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
    grammar_fast_forward: bool = Field(
        default=True,
        description="structured output: append the tokens a grammar forces (a tool call's "
        "name, a schema's keys) in one step instead of one decode step each",
    )
    cpu_linear_backend: Literal["auto", "onednn", "torch"] = Field(
        default="auto", description="CPU matmuls: oneDNN prepacked weights (auto) or F.linear"
    )
    num_threads: int | None = Field(default=None, ge=1, description="torch CPU threads")
    seed: int = 0
    attention: Literal["dense", "sparse"] = Field(
        default="dense", description="decode attention: dense, or top-k block-sparse"
    )
    sparse: SparseAttentionConfig = Field(default_factory=SparseAttentionConfig)
    speculative: SpeculativeConfig = Field(default_factory=SpeculativeConfig)

    @model_validator(mode="after")
    def _check_quantization(self) -> EngineConfig:
        if self.quantization == "none":
            return self
        if self.dtype != "bfloat16":
            raise ValueError(
                f"quantization {self.quantization} runs bf16 activations (its CPU kernels have "
                "no fast float32 path): set dtype: bfloat16"
            )
        if not self.device.startswith("cpu"):
            raise ValueError(f"quantization {self.quantization} is CPU-only (torch's kernels)")
        return self

    @model_validator(mode="after")
    def _check_sparse(self) -> EngineConfig:
        sbs = self.sparse.score_block_size
        if sbs is not None and self.block_size % sbs:
            raise ValueError(f"sparse.score_block_size {sbs} must divide block_size")
        return self

    @model_validator(mode="after")
    def _check_speculative(self) -> EngineConfig:
        check_speculation_attention(self.speculative, self.attention)
        return self

    @property
    def score_block_size(self) -> int:
        return self.sparse.score_block_size or self.block_size

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.dtype]

    @property
    def kv_torch_dtype(self) -> torch.dtype:
        return _TORCH_DTYPES[self.kv_dtype or self.dtype]

    @property
    def weights_id(self) -> str:
        """What besides the checkpoint decides the KV an engine computes ('' for float32
        dense, so existing block keys stay valid): a part of every block key. Where int4
        codes come from (the GGUF, or rounding at load) is added by `engine_model_id`."""
        kv = self.kv_dtype or self.dtype
        if (self.quantization, self.dtype, kv) == ("none", "float32", "float32"):
            return ""
        quant = self.quantization
        if quant == "int4":
            quant += f"-g{self.int4_group_size}"
        if quant != "none" and self.quant_head:
            quant += "-head"
        return f"{quant}/{self.dtype}/kv-{kv}"

    def kv_bytes_per_block(self, model: ModelConfig) -> int:
        itemsize = self.kv_torch_dtype.itemsize
        per_token = model.num_hidden_layers * 2 * model.num_kv_heads * model.head_size
        return per_token * self.block_size * itemsize

    def summary_bytes_per_block(self, model: ModelConfig) -> int:
        """Key summaries kept beside each KV block when attention is sparse (else 0)."""
        if self.attention == "dense":
            return 0
        from engine.kernels.sparse_attention import SparseSpec

        itemsize = self.kv_torch_dtype.itemsize
        spec = SparseSpec((1.0,), 0, 1, 1, self.sparse.summary, self.sparse.global_view)  # width
        width = spec.summary_width
        per_sub = model.num_hidden_layers * width * model.num_kv_heads * model.head_size
        return per_sub * (self.block_size // self.score_block_size) * itemsize

    def resolve_num_blocks(self, model: ModelConfig) -> int:
        if self.num_kv_blocks is not None:
            return self.num_kv_blocks
        per_block = self.kv_bytes_per_block(model) + self.summary_bytes_per_block(model)
        return max(1, self.kv_cache_bytes // per_block)

    def resolve_max_model_len(self, model: ModelConfig) -> int:
        return min(
            self.max_model_len or model.max_position_embeddings, model.max_position_embeddings
        )
