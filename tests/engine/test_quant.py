"""Weight-only quantisation: the int4/int8 kernels against a dequantise-then-matmul float32
reference, round-trip bounds, Linear's dispatch on rows, a GGUF's Q4_1 codes loaded as they
are, and the config that puts how the model is run into every block key.

Bounds use the unit roundoff of bfloat16, U = 2^-8 (8 significant bits): rounding a value
to bf16 moves it by at most U times its magnitude."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from pydantic import ValidationError
from safetensors.torch import load_file

from engine import EngineConfig, EngineCore
from engine.gguf_weights import MARKER, gguf_source, read_q4_1, unpack_q4_1
from engine.layers.linear import Linear
from engine.loader import engine_model_id, model_fingerprint
from engine.quant import (
    Int4Weight,
    Int8Weight,
    cpu_kernels_available,
    quantize_int4,
    quantize_int8,
    quantize_weight,
)
from ops.model_fetch import convert_gguf
from tests.helpers import TINY_CHAT_TEMPLATE, write_tiny_tokenizer

U = 2.0**-8  # bfloat16 unit roundoff
U32 = 2.0**-24  # float32 unit roundoff
BF16 = torch.bfloat16
Q4_1 = GGMLQuantizationType.Q4_1
needs_kernels = pytest.mark.skipif(
    not cpu_kernels_available(), reason="torch without its CPU weight-only kernels"
)


def mm_tolerance(x: torch.Tensor, w: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-element bound for a float32-accumulated matmul rounded once to bf16: U |ref| for
    the output rounding, plus 2 K U32 (|x| @ |w|^T) for the float32 sums (and their effect
    on the rounding); observed errors stay under U |ref| + 1e-6."""
    k = x.shape[1]
    return U * ref.abs() + 2 * k * U32 * (x.float().abs() @ w.abs().T)


# (out_features N, in_features K, int4 group size): the tiny model's qkv, wider K, every group
INT4_CASES = [(128, 64, 32), (128, 64, 64), (96, 256, 32), (96, 256, 64), (96, 256, 128)]
INT4_CASES += [(96, 256, 256), (64, 128, 128), (256, 512, 256)]


@needs_kernels
@pytest.mark.parametrize("num_rows", [1, 3, 17])
@pytest.mark.parametrize(("n", "k", "group"), INT4_CASES)
def test_int4_mm_matches_dequantised_float32_matmul(n, k, group, num_rows):
    g = torch.Generator().manual_seed(n * k + group + num_rows)
    quant = Int4Weight(quantize_int4(torch.randn(n, k, generator=g) * 0.1, group))
    x = torch.randn(num_rows, k, generator=g).to(BF16)
    out = quant.mm(x)
    assert out.dtype == BF16 and out.shape == (num_rows, n)
    ref = x.float() @ quant.dense().T
    assert ((out.float() - ref).abs() <= mm_tolerance(x, quant.dense(), ref)).all()


@needs_kernels
@pytest.mark.parametrize("num_rows", [1, 3, 17])
@pytest.mark.parametrize(("n", "k"), [(128, 64), (96, 256), (100, 64), (8, 512)])
def test_int8_mm_matches_dequantised_float32_matmul(n, k, num_rows):
    g = torch.Generator().manual_seed(n * k + num_rows)
    quant = Int8Weight(*quantize_int8(torch.randn(n, k, generator=g) * 0.1))
    x = torch.randn(num_rows, k, generator=g).to(BF16)
    out = quant.mm(x)
    assert out.dtype == BF16 and out.shape == (num_rows, n)
    ref = x.float() @ quant.dense().T
    assert ((out.float() - ref).abs() <= mm_tolerance(x, quant.dense(), ref)).all()


def _int4_errors(w: torch.Tensor, group: int) -> tuple[torch.Tensor, ...]:
    """Per group: max |dequantised - w|, the step (scale) and the zero's bf16 rounding."""
    codes = quantize_int4(w, group)
    n, k = w.shape
    err = (codes.dequantize() - w).abs().reshape(n, k // group, group).amax(-1)
    zero_rounding = (codes.zero.to(BF16).float() - codes.zero).abs()
    return err, codes.scale, zero_rounding


@pytest.mark.parametrize("group", [32, 64, 128, 256])
def test_int4_round_trip_within_half_a_step_plus_the_zeros_rounding(group):
    """Codes are chosen against the float32 zero (lo + 8 * scale); the kernel stores it in
    bf16, which moves every value of the group by that rounding on top of half a step."""
    w = torch.randn(48, 512, generator=torch.Generator().manual_seed(group)) * 0.1
    err, scale, zero_rounding = _int4_errors(w, group)
    assert (err <= scale / 2 + zero_rounding + 4 * U32 * w.abs().max()).all()


@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["centred", "offset"])
def test_int4_round_trip_within_half_a_step(offset):
    g = torch.Generator().manual_seed(3)
    if offset:
        spread = torch.rand(16, 256, generator=g) * 0.01
    else:
        spread = torch.randn(64, 512, generator=g) * 0.1
    err, scale, _ = _int4_errors(offset + spread, 32)
    assert (err <= scale / 2 * (1 + 1e-3)).all()


def test_int8_round_trip_within_half_a_step_per_row():
    w = torch.randn(64, 384, generator=torch.Generator().manual_seed(5))
    codes, scale = quantize_int8(w)
    assert codes.dtype == torch.int8 and codes.abs().max() <= 127
    assert torch.equal(scale, scale.to(BF16).float())  # the step is exactly what the kernel holds
    err = (codes.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + U32 * w.abs()).all()


def test_int4_rejects_group_sizes_the_kernel_lacks():
    with pytest.raises(ValueError, match="group size 48"):
        quantize_int4(torch.randn(16, 96), 48)
    with pytest.raises(ValueError, match="multiple"):
        quantize_int4(torch.randn(16, 96), 64)


@needs_kernels
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_linear_runs_the_kernel_up_to_max_rows_and_the_dense_copy_above(kind, monkeypatch):
    """Decode-sized calls (<= max_rows) read the quantised weight; prefill-sized calls read
    its dense bf16 copy. Both compute with the same weight and add the bias."""
    g = torch.Generator().manual_seed(11)
    layer = Linear(64, 128, bias=True)
    quant = quantize_weight(torch.randn(128, 64, generator=g) * 0.1, kind)
    layer.set_quant(quant, max_rows=4, dtype=BF16)
    layer.to(BF16)  # as the runner does after quantising: the bias too
    with torch.no_grad():
        layer.bias.copy_(torch.randn(128, generator=g))
    real_mm = quant.mm
    rows_seen: list[int] = []
    monkeypatch.setattr(quant, "mm", lambda x: rows_seen.append(x.shape[0]) or real_mm(x))
    x = torch.randn(9, 64, generator=g).to(BF16)
    with torch.no_grad():
        small, boundary, large = layer(x[:2]), layer(x[:4]), layer(x)
    assert rows_seen == [2, 4]  # the 9-row call never reached the kernel
    assert torch.equal(boundary, real_mm(x[:4]) + layer.bias)
    assert torch.equal(small, real_mm(x[:2]) + layer.bias)
    assert torch.equal(large, F.linear(x, quant.dense().to(BF16), layer.bias))
    ref = x.float() @ quant.dense().T + layer.bias.float()
    # bf16 roundings: the dense copy's weights, the matmul output, the bias add
    bound = 3 * U * (x.float().abs() @ quant.dense().abs().T + layer.bias.float().abs())
    assert ((small.float() - ref[:2]).abs() <= bound[:2]).all()
    assert ((large.float() - ref).abs() <= bound).all()


def test_set_quant_refuses_a_weight_of_another_shape():
    layer = Linear(64, 128, bias=False)
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="64x64"):
        layer.set_quant(quantize_weight(torch.randn(64, 64), "int8"), max_rows=4, dtype=BF16)
    assert layer.quant is None and torch.equal(layer.weight, before)


# ---------------------------------------------------------------- GGUF Q4_1, as llama.cpp writes
HIDDEN, LAYERS, HEADS, KV_HEADS, INTER = 64, 2, 4, 2, 128
HEAD_DIM = HIDDEN // HEADS
LINEARS = {  # HF name (after model.layers.N.) -> GGUF name (after blk.N.), [N, K]
    "self_attn.q_proj.weight": ("attn_q.weight", (HEADS * HEAD_DIM, HIDDEN)),
    "self_attn.k_proj.weight": ("attn_k.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
    "self_attn.v_proj.weight": ("attn_v.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
    "self_attn.o_proj.weight": ("attn_output.weight", (HIDDEN, HEADS * HEAD_DIM)),
    "mlp.gate_proj.weight": ("ffn_gate.weight", (INTER, HIDDEN)),
    "mlp.up_proj.weight": ("ffn_up.weight", (INTER, HIDDEN)),
    "mlp.down_proj.weight": ("ffn_down.weight", (HIDDEN, INTER)),
}
FUSED = {  # our module (after layers.N.) -> its HF parts, in row order
    "self_attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "self_attn.o_proj": ["self_attn.o_proj"],
    "mlp.gate_up_proj": ["mlp.gate_proj", "mlp.up_proj"],
    "mlp.down_proj": ["mlp.down_proj"],
}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to q/k rows (rotate-half -> interleaved)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def write_tiny_gguf(out: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A 2-layer llama GGUF at `out/tiny.gguf` with Q4_1 linears and head, F32 norms and
    embedding, and the tiny BPE tokenizer. Returns the HF-layout float32 linears it holds."""
    write_tiny_tokenizer(out / "tok")
    tok = json.loads((out / "tok" / "tokenizer.json").read_text())
    tokens = [t for t, _ in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])]
    special = {t["content"] for t in tok["added_tokens"]}
    w = gguf.GGUFWriter(str(out / "tiny.gguf"), "llama")
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_block_count(LAYERS)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])  # control / normal
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(TINY_CHAT_TEMPLATE)
    rng = np.random.default_rng(seed)
    w.add_tensor("token_embd.weight", rng.standard_normal((len(tokens), HIDDEN), np.float32))
    w.add_tensor("output_norm.weight", 1 + 0.1 * rng.standard_normal(HIDDEN, np.float32))
    head = 0.5 * rng.standard_normal((len(tokens), HIDDEN), np.float32)
    w.add_tensor("output.weight", gguf.quants.quantize(head, Q4_1), raw_dtype=Q4_1)
    hf: dict[str, np.ndarray] = {"lm_head.weight": head}
    for i in range(LAYERS):
        for norm in ("attn_norm.weight", "ffn_norm.weight"):
            w.add_tensor(f"blk.{i}.{norm}", 1 + 0.1 * rng.standard_normal(HIDDEN, np.float32))
        for name, (gguf_name, shape) in LINEARS.items():
            dense = 0.15 * rng.standard_normal(shape, np.float32)
            hf[f"model.layers.{i}.{name}"] = dense
            heads = {"attn_q.weight": HEADS, "attn_k.weight": KV_HEADS}.get(gguf_name)
            stored = llama_cpp_permute(dense, heads) if heads else dense
            w.add_tensor(f"blk.{i}.{gguf_name}", gguf.quants.quantize(stored, Q4_1), raw_dtype=Q4_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    out = tmp_path_factory.mktemp("gguf")
    return out / "tiny.gguf", write_tiny_gguf(out)


@pytest.fixture(scope="module")
def converted(tiny_gguf) -> Path:
    """The tiny GGUF converted by `ops model fetch`'s converter (marker names the GGUF)."""
    return convert_gguf(tiny_gguf[0], tiny_gguf[0].parent / "tiny-llama")


def hf_q4_1(dense: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_1 of an HF-layout weight: rows are quantised alone, so this is the file's codes
    with the converter's row permutation undone."""
    return unpack_q4_1(gguf.quants.quantize(dense, Q4_1), dense.shape[0])


def test_unpack_q4_1_reproduces_gguf_dequantize_exactly():
    rng = np.random.default_rng(1)
    w = (0.3 + 0.1 * rng.standard_normal((96, 256))).astype(np.float32)
    raw = gguf.quants.quantize(w, Q4_1)
    codes, d, m = unpack_q4_1(raw, 96)
    assert codes.dtype == torch.uint8 and codes.shape == (96, 256) and codes.max() <= 15
    assert d.shape == m.shape == (96, 8)
    ours = codes.float() * d.repeat_interleave(32, 1) + m.repeat_interleave(32, 1)
    assert torch.equal(ours, torch.from_numpy(gguf.quants.dequantize(raw, Q4_1)).reshape(96, 256))


def test_read_q4_1_gives_hf_rows_of_every_q4_1_tensor(tiny_gguf):
    """q and k rows come back un-permuted (with their own head counts, 4 vs 2), so codes and
    scales match the HF layout the converter writes; F32 tensors are left to the dense loader."""
    path, hf = tiny_gguf
    q = hf["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(llama_cpp_permute(q, HEADS), q)  # the file's rows do move
    by_name = read_q4_1(path, HEADS, KV_HEADS)
    assert set(by_name) == set(hf)  # every linear and the head; no norm or embedding
    for name, dense in hf.items():
        codes, d, m = hf_q4_1(dense)
        got = by_name[name]
        assert got.group_size == 32
        assert torch.equal(got.codes, codes), name
        assert torch.equal(got.scale, d) and torch.equal(got.zero, m + 8 * d), name


@needs_kernels
def test_int4_engine_runs_the_gguf_codes_as_they_are(converted, tiny_gguf):
    """Every quantised linear's weight is the file's Q4_1 code with d and m + 8d rounded to
    bf16 (exactly), hence within 8 U |d| + U |m + 8d| of the converter's dequantised weight."""
    _, hf = tiny_gguf
    assert gguf_source(converted) == tiny_gguf[0]
    engine = EngineCore(
        EngineConfig(
            model=converted, dtype="bfloat16", quantization="int4", num_threads=1, num_kv_blocks=8
        )
    )
    assert engine.runner.quant_sources == {"gguf": 4 * LAYERS, "quantised": 0}
    modules = dict(engine.runner.model.named_modules())
    assert modules["lm_head"].quant is None  # the head stays dense
    converted_weights = load_file(str(converted / "model.safetensors"))
    for i in range(LAYERS):
        for module_name, parts in FUSED.items():
            quant = modules[f"layers.{i}.{module_name}"].quant
            assert isinstance(quant, Int4Weight) and quant.group_size == 32
            shards = [hf_q4_1(hf[f"model.layers.{i}.{part}.weight"]) for part in parts]
            codes, d, m = (torch.cat(x) for x in zip(*shards, strict=True))
            d32, zero32 = d.repeat_interleave(32, 1), (m + 8 * d).repeat_interleave(32, 1)
            expected = (codes.float() - 8) * d32.to(BF16).float() + zero32.to(BF16).float()
            assert torch.equal(quant.dense(), expected), module_name
            dense = torch.cat([converted_weights[f"model.layers.{i}.{p}.weight"] for p in parts])
            bound = 8 * U * d32.abs() + U * zero32.abs() + 4 * U32 * dense.abs()
            assert ((quant.dense() - dense).abs() <= bound).all(), module_name


@needs_kernels
@pytest.mark.parametrize(
    ("kind", "marker"), [("int4", False), ("int8", True)], ids=["int4-no-marker", "int8"]
)
def test_engine_quantises_from_dense_without_gguf_codes(converted, tmp_path, kind, marker):
    """No marker (a plain HF directory) or int8: every linear is quantised from its dense
    copy; the GGUF is never read."""
    model = tmp_path / "copy"
    shutil.copytree(converted, model)
    if not marker:
        (model / MARKER).unlink()
    config = EngineConfig(model=model, dtype="bfloat16", quantization=kind, num_kv_blocks=8)
    engine = EngineCore(config)
    assert engine.runner.quant_sources == {"gguf": 0, "quantised": 4 * LAYERS}


def test_gguf_source_needs_a_marker_naming_an_existing_gguf(tmp_path):
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    model = tmp_path / "model"
    model.mkdir()
    assert gguf_source(model) is None
    for source, expected in [(str(gguf_file), gguf_file), (str(tmp_path / "gone.gguf"), None)]:
        (model / MARKER).write_text(json.dumps({"source": source}))
        assert gguf_source(model) == expected
    (model / MARKER).write_text("not json")
    assert gguf_source(model) is None


# ---------------------------------------------------------------- config and block-key identity
def test_quantization_needs_bfloat16_on_cpu(tiny_model_dir):
    for dtype in ("float32", "float16"):
        with pytest.raises(ValidationError, match="dtype"):
            EngineConfig(model=tiny_model_dir, dtype=dtype, quantization="int4")
    with pytest.raises(ValidationError, match="CPU-only"):
        EngineConfig(model=tiny_model_dir, dtype="bfloat16", quantization="int8", device="cuda")
    assert EngineConfig(model=tiny_model_dir, dtype="float32").quantization == "none"


RUN_MODES = [  # (quantization, dtype, kv_dtype): each computes different KV
    ("none", "float32", None),
    ("none", "bfloat16", None),
    ("none", "bfloat16", "float32"),
    ("none", "float32", "bfloat16"),
    ("int4", "bfloat16", None),
    ("int4", "bfloat16", "float32"),
    ("int8", "bfloat16", None),
]


def test_every_run_mode_has_its_own_weights_and_model_id(tiny_model_dir):
    """Block keys carry how the model is run, so no engine imports KV another kind of engine
    computed; float32 dense keeps the bare fingerprint (existing stored keys stay valid)."""
    configs = [
        EngineConfig(model=tiny_model_dir, quantization=q, dtype=d, kv_dtype=kv)
        for q, d, kv in RUN_MODES
    ]
    ids = [c.weights_id for c in configs]
    assert ids[0] == "" and len(set(ids)) == len(ids)
    fingerprint = model_fingerprint(tiny_model_dir)
    model_ids = [engine_model_id(c) for c in configs]
    assert model_ids[0] == fingerprint and len(set(model_ids)) == len(model_ids)
    assert all(m == f"{fingerprint}#{w}" for m, w in zip(model_ids[1:], ids[1:], strict=True))
    # naming the KV dtype the engine would use anyway is the same KV
    explicit = EngineConfig(model=tiny_model_dir, dtype="bfloat16", kv_dtype="bfloat16")
    assert explicit.weights_id == configs[1].weights_id


def test_int4_group_size_is_part_of_the_weights_id(tiny_model_dir):
    a, b = (
        EngineConfig(model=tiny_model_dir, dtype="bfloat16", quantization="int4", int4_group_size=g)
        for g in (32, 128)
    )
    assert a.weights_id != b.weights_id
