"""Model and device presets for the simulator, with the arithmetic behind each number.

FLOPs: a token multiplies through `params_active` weights (2 FLOPs each); each query-key
pair costs QK (2·heads·d_qk) + PV (2·heads·d_v) per layer. DSA models (DeepSeek-V3.2 and
the paper's 27B) attend to at most `sparse_topk` keys per query, but their indexer scores
every key (2·idx_heads·idx_dim per pair per layer). KV per token: MLA keeps a 512-dim latent
+ 64-dim RoPE key per layer, 576 B in FP8; GQA keeps K and V per KV head.

Check against the paper (Table 1, GB of KV per PFLOP of prefill, 429 appended tokens):
these give 13.1 / 22.7 / 36.3 for DS 660B at 16K / 32K / 64K context (paper: 13–36,
"≈22" at 32K) and 117 / 270 for Qwen2.5-32B at 16K / 64K (paper: 117–267);
`tests/sim/test_perf.py` keeps them there.

GPU efficiencies are assumptions, not fits: no GPU was lent to this task. They are typical
Hopper figures (prefill MFU a third of the dense peak, decode at 70 % of HBM bandwidth) and
an EP-decode step overhead (dispatch + combine all-to-all over 58 MoE layers) chosen near
the paper's own 2P4D TPOT; docs/BENCHMARKS.md compares the results with the paper's.
"""

from __future__ import annotations

from ops.sim.config import DeviceConfig, DType, ModelConfig

MLA_KV_BYTES = 512 + 64  # FP8 latent + RoPE key per layer


def gqa(
    name: str,
    num_layers: int,
    params_total: float,
    params_active: float,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    weight_bytes_per_param: float,
    compute_dtype: DType,
    kv_bytes_per_value: int,
) -> ModelConfig:
    """A dense-attention GQA model: QK + PV per pair, K and V of every KV head stored."""
    return ModelConfig(
        name=name,
        num_layers=num_layers,
        params_total=params_total,
        params_active=params_active,
        weight_bytes_per_param=weight_bytes_per_param,
        compute_dtype=compute_dtype,
        attn_flops_per_pair=num_layers * 4 * num_heads * head_dim,
        kv_bytes_per_token=num_layers * 2 * num_kv_heads * head_dim * kv_bytes_per_value,
    )


def mla_dsa(
    name: str,
    num_layers: int,
    params_total: float,
    params_active: float,
    routed_expert_params: float,
    num_heads: int,
    sparse_topk: int,
    indexer_heads: int,
    indexer_dim: int,
) -> ModelConfig:
    """A DeepSeek-V3.2-style model, FP8 weights: MLA (d_qk 192, d_v 128; an MLA_KV_BYTES
    latent per layer) and DSA (`sparse_topk` keys per query, picked by an indexer of
    `indexer_heads` x `indexer_dim` that scores every key; FP8 keys + a 4-byte scale)."""
    return ModelConfig(
        name=name,
        num_layers=num_layers,
        params_total=params_total,
        params_active=params_active,
        routed_expert_params=routed_expert_params,
        weight_bytes_per_param=1,
        compute_dtype="fp8",
        attn_flops_per_pair=num_layers * (2 * num_heads * 192 + 2 * num_heads * 128),
        sparse_topk=sparse_topk,
        indexer_flops_per_pair=num_layers * 2 * indexer_heads * indexer_dim,
        kv_bytes_per_token=num_layers * MLA_KV_BYTES,
        indexer_bytes_per_token=num_layers * (indexer_dim + 4),
    )


MODELS: dict[str, ModelConfig] = {
    m.name: m
    for m in (
        # The real model of the one-machine benchmark: 30 layers, hidden 576, 9 heads (3 KV),
        # head dim 64, MLP 1536, tied 49,152-token embedding, fp32. Non-embedding parameters
        # 30 x (2·576² + 2·576·192 + 3·576·1536) = 106.2M; all weights 134.5M = 538 MB.
        # KV 46,080 B per token.
        gqa("smollm2-135m", 30, 134.5e6, 106.17e6, 9, 3, 64, 4, "fp32", kv_bytes_per_value=4),
        # DeepSeek-V3.2 (the paper's DS 660B): 671B total / 37B active; 61 layers (3 dense),
        # 256 routed experts of 3·7168·2048 in 58 MoE layers = 654B routed. MLA with 128
        # heads; DSA top-2048; indexer 64 heads x 128. KV 35,136 B per token.
        mla_dsa(
            "ds-660b",
            num_layers=61,
            params_total=671e9,
            params_active=37e9,
            routed_expert_params=58 * 256 * 3 * 7168 * 2048,
            num_heads=128,
            sparse_topk=2048,
            indexer_heads=64,
            indexer_dim=128,
        ),
        # The paper's DS 27B (App. A.2): hidden 2560, 30 layers (1 dense, MLP 12288), 32
        # heads, 72 routed experts (MLP 1536) + 2 shared, 6 active; indexer 32 x 64,
        # top-1024. MLA dims as V3 (not stated). Attention 31.9M/layer; experts 11.8M each:
        # total 27.2B, routed 29·72·11.8M = 24.6B, active 0.96 + 29·8·11.8M + 0.09 + 0.33
        # (head) + 0.2 = 4.3B. KV 17,280 B per token.
        mla_dsa(
            "ds-27b",
            num_layers=30,
            params_total=27.2e9,
            params_active=4.3e9,
            routed_expert_params=29 * 72 * 3 * 2560 * 1536,
            num_heads=32,
            sparse_topk=1024,
            indexer_heads=32,
            indexer_dim=64,
        ),
        # Qwen2.5-32B: 64 layers, hidden 5120, 40 heads (8 KV) of 128, MLP 27648, 32.8B
        # weights (32.0B without the input embedding). FP16 KV as in the paper: 256 KiB per
        # token. Weights assumed FP8 so that data-parallel decode engines (the paper's
        # DualPath setup) keep ~40 GB of an 80 GB GPU for KV; in BF16 they would hold barely
        # one 32K context.
        gqa("qwen2.5-32b", 64, 32.8e9, 32.0e9, 40, 8, 128, 1, "bf16", kv_bytes_per_value=2),
    )
}

DEVICES: dict[str, DeviceConfig] = {
    # H800/H100 SXM: 989 TFLOP/s BF16 and 1979 FP8 dense, 3.35 TB/s HBM3, 80 GB.
    "hopper": DeviceConfig(
        name="hopper",
        peak_flops={"bf16": 989e12, "fp8": 1979e12, "fp32": 67e12},
        mem_bytes_per_s=3.35e12,
        mem_bytes=80e9,
        prefill_linear_eff=0.35,
        prefill_attn_eff=0.3,
        decode_mem_eff=0.7,
        decode_step_overhead_s=0.015,
        prefill_step_overhead_s=0.01,
        decode_combine="max",
    ),
}


def resolve_model(model: str | ModelConfig) -> ModelConfig:
    if isinstance(model, ModelConfig):
        return model
    if model not in MODELS:
        raise ValueError(f"unknown model preset {model!r}; known: {sorted(MODELS)}")
    return MODELS[model]


def resolve_device(device: str | DeviceConfig) -> DeviceConfig:
    """A preset, or "cpu-<n>t": this machine with n torch threads, fitted by calibration.py."""
    if isinstance(device, DeviceConfig):
        return device
    if device.startswith("cpu-") and device.endswith("t"):
        from ops.sim.calibration import fit_cpu_device

        return fit_cpu_device(int(device[4:-1]))
    if device not in DEVICES:
        raise ValueError(f"unknown device preset {device!r}; known: {sorted(DEVICES)} + cpu-Nt")
    return DEVICES[device]
