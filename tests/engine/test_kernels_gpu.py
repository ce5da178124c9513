"""Kernel dispatch on a GPU: the torch reference on CUDA equals the CPU reference, and the
whole sparse decode / fused MoE path through the compiled extension equals the reference.

Skipped without CUDA. The primitives one by one (poisoned outputs, odd shapes) are in
test_kernels_gpu_ext.py; this file checks what the engine calls (ops.*).
"""

from __future__ import annotations

import pytest
import torch

from engine import env
from engine.kernels import ops
from engine.kernels.moe import RouterSpec, select_experts
from engine.kernels.sparse_attention import SparseSpec, update_summaries
from tests.engine.test_sparse_attention import _paged

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _sparse_inputs(seed: int, dtype: torch.dtype, lens: list[int], global_view: bool):
    kv_heads = 2
    cache, tables, g = _paged(seed, lens, kv_heads, 64, dtype)
    q = torch.randn(len(lens), 4 * kv_heads, 64, generator=g).to(dtype)
    spec = SparseSpec((0.2,), 64, 64, 16, global_view=global_view)
    num_sub = cache.shape[1] * 4
    summ = torch.zeros(num_sub, spec.summary_width, kv_heads, 64, dtype=dtype)
    update_summaries(cache, summ, torch.arange(num_sub), "minmax", global_view)
    return q, cache, summ, tables, torch.tensor(lens), spec


def _cuda(args: tuple) -> list:
    return [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fraction", [1.0, 0.2])
def test_sparse_reference_on_cuda_matches_cpu(dtype, fraction):
    q, cache, summ, tables, lens, spec = _sparse_inputs(1, dtype, [700, 1500, 64], True)
    cpu_out, cpu_read, cpu_summ = ops.sparse_decode_attention(
        q, cache, summ, tables, lens, fraction, spec, 0.125, backend="reference"
    )
    q, cache, summ, tables, lens, spec = _cuda((q, cache, summ, tables, lens, spec))
    out, read, summ_read = ops.sparse_decode_attention(
        q, cache, summ, tables, lens, fraction, spec, 0.125, backend="reference"
    )
    torch.testing.assert_close(out.cpu().float(), cpu_out.float(), rtol=2e-2, atol=2e-2)
    assert read.cpu().tolist() == cpu_read.tolist()
    assert summ_read.cpu().tolist() == cpu_summ.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lens", [[1, 65, 4096], [8192]])
@pytest.mark.parametrize("global_view", [False, True])
def test_sparse_decode_through_extension_matches_reference(dtype, lens, global_view):
    args = _cuda(_sparse_inputs(2, dtype, lens, global_view))
    args = args[:5] + [0.2] + args[5:]  # fraction before spec
    ref, ref_read, _ = ops.sparse_decode_attention(*args, 0.125, backend="reference")
    out, read, _ = ops.sparse_decode_attention(*args, 0.125, backend="cuda")
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    assert torch.equal(read, ref_read)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("num_tokens", "experts", "top_k"), [(1, 8, 2), (257, 64, 6)])
def test_fused_moe_through_extension_matches_reference(dtype, num_tokens, experts, top_k):
    torch.manual_seed(num_tokens + experts)
    x = torch.randn(num_tokens, 128, device="cuda", dtype=dtype)
    w13 = (torch.randn(experts, 2 * 96, 128, device="cuda") * 0.1).to(dtype)
    w2 = (torch.randn(experts, 128, 96, device="cuda") * 0.1).to(dtype)
    logits = torch.randn(num_tokens, experts, device="cuda")
    weights, ids = select_experts(logits, RouterSpec(top_k=top_k, norm_topk_prob=True))
    ref = ops.fused_moe(x, w13, w2, weights, ids, backend="reference")
    cpu = ops.fused_moe(x.cpu(), w13.cpu(), w2.cpu(), weights.cpu(), ids.cpu())
    torch.testing.assert_close(ref.cpu().float(), cpu.float(), rtol=2e-2, atol=2e-2)
    out = ops.fused_moe(x, w13, w2, weights, ids, backend="cuda")
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("deepseek", [False, True], ids=["qwen2-moe", "deepseek-routing"])
def test_moe_model_kernel_path_matches_reference_path(tmp_path, monkeypatch, deepseek):
    """The MoE model on a tiny random checkpoint: greedy tokens and prompt logits through the
    compiled fused-MoE kernel equal the reference path on the same GPU (float32)."""
    from engine import EngineConfig, EngineCore, SamplingParams
    from tests.engine.test_moe import write_tiny_moe

    path = write_tiny_moe(tmp_path, deepseek, seed=11)
    config = EngineConfig(model=path, device="cuda", block_size=16, num_kv_blocks=64)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = list(range(100, 160))
    outputs = {}
    for backend in ("reference", "cuda"):
        monkeypatch.setenv(env.KERNELS, backend)
        outputs[backend] = EngineCore(config).generate([prompt], params)[0].new_token_ids
    assert outputs["cuda"] == outputs["reference"]


@pytest.mark.model
def test_sparse_engine_kernel_path_matches_reference_path(model_dir, monkeypatch):
    """The default model with `attention: sparse` decodes the same greedy tokens through the
    compiled sparse-attention kernels as through the reference (float32, minmax and mean)."""
    from pydoc_data.topics import topics

    from engine import EngineConfig, EngineCore, SamplingParams
    from engine.config import SparseAttentionConfig

    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    for summary in ("mean", "minmax"):
        config = EngineConfig(
            model=model_dir,
            device="cuda",
            attention="sparse",
            sparse=SparseAttentionConfig(summary=summary),
        )
        outputs = {}
        for backend in ("reference", "cuda"):
            monkeypatch.setenv(env.KERNELS, backend)
            engine = EngineCore(config)
            text = engine.tokenizer.encode(" ".join(v for _, v in sorted(topics.items())))
            outputs[backend] = engine.generate([text[:3000]], params)[0].new_token_ids
        assert outputs["cuda"] == outputs["reference"], summary
