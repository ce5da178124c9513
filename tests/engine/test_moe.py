"""MoE: the reference against naive formulas, and the MoE model end to end on a tiny
random checkpoint this test writes (Qwen2-MoE layout; DeepSeek-style routing variant)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine import EngineConfig, EngineCore, SamplingParams
from engine.batch_scheduler import ScheduledChunk, StepPlan
from engine.config import ModelConfig
from engine.kernels.moe import RouterSpec, fused_moe, moe_layer, select_experts
from engine.loader import load_weights
from engine.models.moe import MoeForCausalLM, SparseMoeBlock
from engine.sequence import Sequence
from kvstore.keys import root_key
from tests.helpers import write_tiny_tokenizer


def _naive_expert(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    inter = w2.shape[1]
    gate, up = x.double() @ w13[:inter].double().T, x.double() @ w13[inter:].double().T
    return (gate * torch.sigmoid(gate) * up) @ w2.double().T


def _naive_routed(x, w13, w2, dense_weights: torch.Tensor) -> torch.Tensor:
    """sum_e dense_weights[:, e] * expert_e(x): every expert on every token (float64)."""
    return sum(
        dense_weights[:, e, None].double() * _naive_expert(x, w13[e], w2[e])
        for e in range(w13.shape[0])
    )


def _naive_route(logits: torch.Tensor, spec: RouterSpec, bias: torch.Tensor | None):
    """Per-token routing written out: {expert: weight} for each token."""
    out = []
    for row in logits.double():
        scores = row.softmax(0) if spec.scoring == "softmax" else row.sigmoid()
        choice = scores + (bias.double() if bias is not None else 0)
        per_group = len(row) // spec.num_groups
        groups = [choice[g * per_group : (g + 1) * per_group] for g in range(spec.num_groups)]
        if spec.scoring == "sigmoid":
            group_score = [sorted(g.tolist())[-2:] for g in groups]
            group_score = [sum(v) for v in group_score]
        else:
            group_score = [g.max().item() for g in groups]
        kept = sorted(range(spec.num_groups), key=lambda g: -group_score[g])[: spec.topk_groups]
        eligible = [e for e in range(len(row)) if e // per_group in kept]
        top = sorted(eligible, key=lambda e: -choice[e].item())[: spec.top_k]
        weights = {e: scores[e].item() for e in top}
        if spec.norm_topk_prob:
            total = sum(weights.values())
            weights = {e: w / total for e, w in weights.items()}
        out.append({e: w * spec.routed_scaling_factor for e, w in weights.items()})
    return out


SPECS = [
    RouterSpec(top_k=2),
    RouterSpec(top_k=3, norm_topk_prob=True),
    RouterSpec(top_k=2, num_groups=4, topk_groups=2),
    RouterSpec(
        top_k=4, scoring="sigmoid", num_groups=4, topk_groups=2, norm_topk_prob=True,
        routed_scaling_factor=2.5,
    ),
]  # fmt: skip


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.scoring}-g{s.num_groups}-k{s.top_k}")
def test_router_matches_naive_routing(spec):
    """Scores, correction bias, group limit, top-k, normalisation and scaling, per token."""
    torch.manual_seed(hash((spec.top_k, spec.num_groups, spec.scoring)) % 2**31)
    logits = torch.randn(13, 16) * 2
    bias = torch.randn(16) * 0.3 if spec.scoring == "sigmoid" else None
    weights, ids = select_experts(logits, spec, bias)
    for t, expected in enumerate(_naive_route(logits, spec, bias)):
        got = dict(zip(ids[t].tolist(), weights[t].tolist(), strict=True))
        assert set(got) == set(expected)
        for e, w in expected.items():
            assert abs(got[e] - w) < 1e-5


@pytest.mark.parametrize(("num_tokens", "top_k"), [(1, 1), (7, 2), (64, 3)])
def test_fused_moe_equals_naive_dense_sum(num_tokens, top_k):
    """Permute -> per-expert GEMM -> un-permute equals the dense formula whose weight
    matrix is zero off the chosen experts (including experts that get no token)."""
    torch.manual_seed(num_tokens * 10 + top_k)
    experts, hidden, inter = 6, 32, 24
    x = torch.randn(num_tokens, hidden)
    w13, w2 = torch.randn(experts, 2 * inter, hidden) * 0.2, torch.randn(experts, hidden, inter)
    weights, ids = torch.rand(num_tokens, top_k), torch.rand(num_tokens, experts).argsort(1)
    ids = ids[:, :top_k]
    dense = torch.zeros(num_tokens, experts).scatter_(1, ids, weights)
    got = fused_moe(x, w13, w2, weights, ids)
    torch.testing.assert_close(got.double(), _naive_routed(x, w13, w2, dense), rtol=1e-5, atol=1e-4)


def test_all_experts_active_equals_dense_softmax_sum():
    """top_k = E: the routed output is sum_e softmax(router)_e * expert_e(x), and adding the
    gated shared expert gives the whole block."""
    torch.manual_seed(42)
    experts, hidden, inter = 5, 16, 8
    x = torch.randn(9, hidden)
    router = torch.randn(experts, hidden)
    w13, w2 = torch.randn(experts, 2 * inter, hidden) * 0.3, torch.randn(experts, hidden, inter)
    s13, s2, s_gate = (
        torch.randn(2 * inter, hidden),
        torch.randn(hidden, inter),
        torch.randn(1, hidden),
    )
    got = moe_layer(x, router, w13, w2, RouterSpec(top_k=experts), None, (s13, s2), s_gate)
    probs = (x.double() @ router.double().T).softmax(-1)
    shared = torch.sigmoid(x.double() @ s_gate.double().T) * _naive_expert(x, s13, s2)
    torch.testing.assert_close(
        got.double(), _naive_routed(x, w13, w2, probs) + shared, rtol=1e-5, atol=1e-4
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_fused_moe_is_close(dtype):
    torch.manual_seed(3)
    x, w13, w2 = torch.randn(20, 32), torch.randn(4, 32, 32) * 0.2, torch.randn(4, 32, 16) * 0.2
    weights, ids = torch.rand(20, 2), torch.randint(0, 4, (20, 2))
    ref = fused_moe(x, w13, w2, weights, ids)
    got = fused_moe(x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ref, rtol=5e-2, atol=5e-2)


# --------------------------------------------------------------------------- the model


def write_tiny_moe(root: Path, deepseek: bool, seed: int) -> Path:
    """config.json + model.safetensors (random weights, Hub names) + the tiny tokenizer."""
    out = root / ("tiny-deepseek-moe" if deepseek else "tiny-qwen2-moe")
    vocab = write_tiny_tokenizer(out)
    g = torch.Generator().manual_seed(seed)
    hidden, layers, heads, kv_heads, head_dim = 64, 3, 4, 2, 16
    experts, moe_inter = 8, 32
    config = {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
        "hidden_size": hidden, "intermediate_size": 96, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
        "max_position_embeddings": 512, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "num_experts": experts, "num_experts_per_tok": 2, "moe_intermediate_size": moe_inter,
        "norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": [1],
        "shared_expert_intermediate_size": 48, "use_sliding_window": False,
    }  # fmt: skip
    if deepseek:
        config |= {
            "shared_expert_intermediate_size": 0, "n_shared_experts": 2, "scoring_func": "sigmoid",
            "topk_method": "noaux_tc", "n_group": 4, "topk_group": 2, "norm_topk_prob": True,
            "routed_scaling_factor": 2.5, "num_experts_per_tok": 3,
        }  # fmt: skip

    def rand(*shape: int, scale: float = 0.15) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    t = {"model.embed_tokens.weight": rand(vocab, hidden, scale=1.0)}
    t["lm_head.weight"] = rand(vocab, hidden, scale=0.3)
    t["model.norm.weight"] = 1 + rand(hidden, scale=0.1)
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + rand(hidden, scale=0.1)
        t[p + "post_attention_layernorm.weight"] = 1 + rand(hidden, scale=0.1)
        for name, rows in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
            t[p + f"self_attn.{name}_proj.weight"] = rand(rows * head_dim, hidden)
            t[p + f"self_attn.{name}_proj.bias"] = rand(rows * head_dim, scale=0.05)
        t[p + "self_attn.o_proj.weight"] = rand(hidden, heads * head_dim)

        def mlp(prefix: str, inter: int) -> None:
            t[prefix + "gate_proj.weight"] = rand(inter, hidden)
            t[prefix + "up_proj.weight"] = rand(inter, hidden)
            t[prefix + "down_proj.weight"] = rand(hidden, inter)

        if i in config["mlp_only_layers"]:
            mlp(p + "mlp.", config["intermediate_size"])
            continue
        t[p + "mlp.gate.weight"] = rand(experts, hidden, scale=0.5)
        for e in range(experts):
            mlp(p + f"mlp.experts.{e}.", moe_inter)
        if deepseek:
            t[p + "mlp.gate.e_score_correction_bias"] = rand(experts, scale=0.1)
            mlp(p + "mlp.shared_experts.", moe_inter * 2)
        else:
            mlp(p + "mlp.shared_expert.", 48)
            t[p + "mlp.shared_expert_gate.weight"] = rand(1, hidden)
    (out / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in t.items()}, str(out / "model.safetensors"))
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["qwen2-moe", "deepseek-routing"])
def moe_engine(request, tmp_path_factory) -> EngineCore:
    path = write_tiny_moe(tmp_path_factory.mktemp("moe"), request.param, seed=7)
    return EngineCore(EngineConfig(model=path, num_threads=2, block_size=16, num_kv_blocks=64))


def test_moe_engine_generates_and_decode_matches_prefill(moe_engine):
    """The engine runs the MoE model end to end; each greedy decode step (paged decode,
    one token per step) picks what a fresh full prefill of the same tokens picks."""
    model = moe_engine.runner.model
    assert isinstance(model, MoeForCausalLM)
    assert any(isinstance(layer.mlp, SparseMoeBlock) for layer in model.layers)
    prompt = moe_engine.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    out = moe_engine.generate([prompt], params)[0].new_token_ids
    assert len(out) == 6
    for n in range(len(out)):
        one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
        again = moe_engine.generate([prompt + out[:n]], one)[0].new_token_ids
        assert again == [out[n]]


def test_moe_block_of_the_loaded_model_equals_naive_formula(moe_engine):
    """The loaded block (router, experts, shared experts as read from safetensors) equals
    the naive formula on the checkpoint's own tensors."""
    layers = moe_engine.runner.model.layers
    i = next(i for i, layer in enumerate(layers) if isinstance(layer.mlp, SparseMoeBlock))
    block = layers[i].mlp
    with safe_open(moe_engine.config.model / "model.safetensors", framework="pt") as f:
        ckpt = {k.removeprefix(f"model.layers.{i}.mlp."): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    num_experts = ckpt["gate.weight"].shape[0]
    w13 = torch.stack(
        [torch.cat([ckpt[f"experts.{e}.gate_proj.weight"], ckpt[f"experts.{e}.up_proj.weight"]])
         for e in range(num_experts)]
    )  # fmt: skip
    w2 = torch.stack([ckpt[f"experts.{e}.down_proj.weight"] for e in range(num_experts)])
    torch.manual_seed(0)
    x = torch.randn(11, 64)
    routes = _naive_route(
        x @ ckpt["gate.weight"].T, block.spec, ckpt.get("gate.e_score_correction_bias")
    )
    dense = torch.zeros(11, num_experts, dtype=torch.float64)
    for t, r in enumerate(routes):
        for e, w in r.items():
            dense[t, e] = w
    ref = _naive_routed(x, w13, w2, dense)
    name = "shared_expert" if "shared_expert_gate.weight" in ckpt else "shared_experts"
    s13 = torch.cat([ckpt[f"{name}.gate_proj.weight"], ckpt[f"{name}.up_proj.weight"]])
    shared = _naive_expert(x, s13, ckpt[f"{name}.down_proj.weight"])
    if name == "shared_expert":
        shared = torch.sigmoid(x.double() @ ckpt["shared_expert_gate.weight"].double().T) * shared
    with torch.inference_mode():
        got = block(x)
    torch.testing.assert_close(got.double(), ref + shared, rtol=1e-5, atol=1e-4)


def _prompt_logits(engine: EngineCore, token_ids: list[int]) -> torch.Tensor:
    """Logits at every prompt position through the engine's paged-cache path."""
    seq = Sequence("logits", list(token_ids), SamplingParams(), root_key("test-moe"))
    engine.block_manager.ensure_slots(seq, seq.num_tokens)
    try:
        input_ids, ctx, _, _ = engine.runner._prepare(
            StepPlan([ScheduledChunk(seq, 0, seq.num_tokens)])
        )
        with torch.inference_mode():
            model = engine.runner.model
            return model.compute_logits(model(input_ids, ctx))
    finally:
        engine.block_manager.free(seq)


@pytest.mark.slow
def test_qwen2_moe_matches_transformers(tmp_path):
    """Prompt logits and greedy tokens equal Hugging Face's Qwen2MoeForCausalLM on the
    same checkpoint (per-expert Hub names, q/k/v biases, gated shared expert)."""
    transformers = pytest.importorskip("transformers")
    path = write_tiny_moe(tmp_path, deepseek=False, seed=11)
    engine = EngineCore(EngineConfig(model=path, num_threads=2, block_size=16, num_kv_blocks=32))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    ids = engine.tokenizer.encode("Sparse experts route every token to a few of them.")
    with torch.inference_mode():
        theirs = hf(torch.tensor([ids])).logits[0].float()
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, min_new_tokens=5)
    torch.testing.assert_close(_prompt_logits(engine, ids), theirs, rtol=1e-4, atol=1e-4)
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    assert engine.generate([ids], params)[0].new_token_ids == ref[0, len(ids) :].tolist()


def _restack(src: Path, dst: Path, drop: str | None = None) -> None:
    """Copy a tiny checkpoint with experts in transformers-5 fused names (or one dropped)."""
    shutil.copytree(src, dst)
    with safe_open(src / "model.safetensors", framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if drop is not None:
        del t[drop]
    else:
        for i in range(3):
            p = f"model.layers.{i}.mlp.experts."
            if p + "0.gate_proj.weight" not in t:
                continue
            gate_up = [
                torch.cat([t.pop(p + f"{e}.gate_proj.weight"), t.pop(p + f"{e}.up_proj.weight")])
                for e in range(8)
            ]
            t[p + "gate_up_proj"] = torch.stack(gate_up)
            t[p + "down_proj"] = torch.stack([t.pop(p + f"{e}.down_proj.weight") for e in range(8)])
    save_file(t, str(dst / "model.safetensors"))


def test_fused_expert_checkpoint_loads_the_same_and_missing_experts_fail(tmp_path):
    """Per-expert Hub names and transformers-5 stacked names give the same model; a
    checkpoint missing one expert's matrix is refused, never half-loaded."""
    src = write_tiny_moe(tmp_path, deepseek=True, seed=5)
    _restack(src, tmp_path / "fused")
    _restack(src, tmp_path / "broken", drop="model.layers.0.mlp.experts.3.up_proj.weight")
    a, b = (MoeForCausalLM(ModelConfig.from_dir(src), max_positions=64) for _ in range(2))
    load_weights(a, src)
    load_weights(b, tmp_path / "fused")
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    with pytest.raises(ValueError):
        load_weights(
            MoeForCausalLM(ModelConfig.from_dir(src), max_positions=64), tmp_path / "broken"
        )
