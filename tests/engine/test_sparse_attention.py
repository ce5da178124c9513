"""Sparse decode attention reference against naive formulas, on fresh random inputs.

The naive side loops over sequences and heads in float64: dense softmax attention over the
first L tokens, and a from-scratch selection (min/max bounds per block, per-head softmax
mass summed over the GQA group, sinks + window + top-k) that shares no code with the
reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine import env
from engine.config import EngineConfig, ModelConfig, SparseAttentionConfig
from engine.kernels import ops
from engine.kernels.moe import fused_moe as moe_ref
from engine.kernels.sparse_attention import (
    SparseSpec,
    budget_tokens,
    score_blocks,
    sparse_decode_attention,
    summarize_block,
    update_summaries,
)
from engine.kv_cache import KVCache


def _paged(seed: int, lens: list[int], kv_heads: int, block_size: int, dtype=torch.float32):
    """A random cache with each sequence's blocks scattered through the pool."""
    g = torch.Generator().manual_seed(seed)
    widths = [-(-n // block_size) for n in lens]
    num_blocks = sum(widths) + 3
    cache = torch.randn(2, num_blocks, block_size, kv_heads, 64, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables, at = [], 0
    for w in widths:
        tables.append(perm[at : at + w] + [0] * (max(widths) - w))
        at += w
    return cache, torch.tensor(tables), g


def _context(cache: torch.Tensor, table: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [n, KVH, D] of one sequence, read naively block by block."""
    keys = torch.cat([cache[0, b] for b in table.tolist()])[:n]
    values = torch.cat([cache[1, b] for b in table.tolist()])[:n]
    return keys.double(), values.double()


def _naive_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float):
    """q [D], keys/values [n, D] -> softmax(q k^T * scale) v, float64."""
    w = torch.softmax((keys @ q.double()) * scale, dim=0)
    return w @ values


def _all_summaries(cache: torch.Tensor, spec: SparseSpec) -> torch.Tensor:
    num_blocks, bs = cache.shape[1], cache.shape[2]
    num_sub = num_blocks * bs // spec.score_block_size
    summ = torch.zeros(num_sub, spec.summary_width, *cache.shape[3:], dtype=cache.dtype)
    update_summaries(cache, summ, torch.arange(num_sub), spec.summary, spec.global_view)
    return summ


def _naive_selection(q, keys, n: int, fraction: float, spec: SparseSpec, scale: float):
    """Token positions one KV-head group reads: q [G, D], keys [n, D] (float64)."""
    sbs = spec.score_block_size
    num_sub = -(-n // sbs)
    sinks = set(range(min(num_sub, -(-spec.num_sink_tokens // sbs))))
    window = set(range(max(0, n - spec.window_tokens) // sbs, num_sub))
    forced = sinks | window
    forced_tokens = sum(min(sbs, n - j * sbs) for j in forced)
    extra = max(0, math.ceil(n * fraction) - forced_tokens) // sbs
    full = n // sbs
    if spec.summary == "sparq":
        mass = _naive_channel_mass(q, keys[: full * sbs], sbs, spec.channels, scale)
    else:
        bounds = torch.empty(q.shape[0], full, dtype=torch.float64)
        for j in range(full):
            block = keys[j * sbs : (j + 1) * sbs]
            lo, hi = block.min(0).values, block.max(0).values
            for h in range(q.shape[0]):
                if spec.summary == "minmax":
                    bounds[h, j] = torch.maximum(q[h] * lo, q[h] * hi).sum()
                else:
                    bounds[h, j] = q[h] @ block.mean(0)
        mass = torch.softmax(bounds * scale, dim=1).sum(0)
    candidates = sorted((j for j in range(full) if j not in forced), key=lambda j: -mass[j])
    chosen = forced | set(candidates[:extra])
    picked = [p for j in sorted(chosen) for p in range(j * sbs, min(n, (j + 1) * sbs))]
    return picked, sorted(candidates[extra:]), extra


def _naive_channel_mass(q, keys, sbs: int, channels: int, scale: float) -> torch.Tensor:
    """SparQ-style block mass of one group: q [G, D], keys [full * sbs, D] (float64)."""
    chosen = sorted(q.abs().sum(0).topk(channels).indices.tolist())
    mass = torch.zeros(len(keys) // sbs, dtype=torch.float64)
    for h in range(q.shape[0]):
        spread = (q[h].abs().sum() / q[h, chosen].abs().sum()).sqrt()
        logits = torch.stack([q[h, chosen] @ k[chosen] for k in keys]) * scale * spread
        mass += torch.softmax(logits, dim=0).view(-1, sbs).sum(1)
    return mass


def _naive_global_attention(q, keys, values, picked, compressed, sbs: int, scale: float):
    """Softmax over the picked tokens plus one (mean key, mean value) entry per compressed
    block with logit bias log(sbs), float64."""
    blocks = [(keys[j * sbs : (j + 1) * sbs], values[j * sbs : (j + 1) * sbs]) for j in compressed]
    all_k = torch.cat([keys[picked]] + [k.mean(0, keepdim=True) for k, _ in blocks])
    all_v = torch.cat([values[picked]] + [v.mean(0, keepdim=True) for _, v in blocks])
    bias = torch.tensor([0.0] * len(picked) + [math.log(sbs)] * len(blocks), dtype=torch.float64)
    return torch.softmax(all_k @ q * scale + bias, dim=0) @ all_v


@pytest.mark.parametrize(("num_heads", "kv_heads"), [(4, 4), (8, 2), (9, 3)])
@pytest.mark.parametrize("score_block_size", [8, 32])
@pytest.mark.parametrize("global_view", [False, True])
def test_full_budget_equals_naive_dense(num_heads, kv_heads, score_block_size, global_view):
    """At fraction 1 every block is read: the output is dense attention, for any lengths,
    GQA shape and scattered block table (and no compressed entry takes part)."""
    seed = 1000 * num_heads + score_block_size + global_view
    lens = [1, 33, 95, 128]
    cache, tables, g = _paged(seed, lens, kv_heads, 32)
    spec = SparseSpec((1.0,), 8, 8, score_block_size, global_view=global_view)
    q = torch.randn(len(lens), num_heads, 64, generator=g)
    out, read, _ = sparse_decode_attention(
        q, cache, _all_summaries(cache, spec), tables, torch.tensor(lens), 1.0, spec, 0.125
    )
    group = num_heads // kv_heads
    for b, n in enumerate(lens):
        keys, values = _context(cache, tables[b], n)
        for h in range(num_heads):
            kv_h = h // group
            ref = _naive_attention(q[b, h], keys[:, kv_h], values[:, kv_h], 0.125)
            torch.testing.assert_close(out[b, h].double(), ref, rtol=1e-5, atol=1e-5)
    assert read.tolist() == lens


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.6])
@pytest.mark.parametrize("global_view", [False, True])
@pytest.mark.parametrize("summary", ["minmax", "mean", "sparq"])
def test_small_budget_matches_naive_selection_and_attention(fraction, global_view, summary):
    """Below 100% the reference reads exactly the naive selection (sinks, window, top-k
    blocks by group mass) and attends over exactly those tokens, plus, with the global
    view, one mean-key/mean-value entry per unselected full block; and it counts the
    summary vectors it read."""
    lens = [200, 257, 64, 640]
    kv_heads, num_heads, scale = 2, 6, 64**-0.5
    seed = int(fraction * 1000) + global_view + 7 * len(summary)
    cache, tables, g = _paged(seed, lens, kv_heads, 32)
    spec = SparseSpec((fraction,), 16, 24, 16, summary, global_view)
    q = torch.randn(len(lens), num_heads, 64, generator=g) * 2
    out, read, summaries_read = sparse_decode_attention(
        q, cache, _all_summaries(cache, spec), tables, torch.tensor(lens), fraction, spec, scale
    )
    group = num_heads // kv_heads
    naive = []
    for b, n in enumerate(lens):
        keys, values = _context(cache, tables[b], n)
        for kv_h in range(kv_heads):
            heads = range(kv_h * group, (kv_h + 1) * group)
            qg = q[b, list(heads)].double()
            picked, compressed, extra = _naive_selection(
                qg, keys[:, kv_h], n, fraction, spec, scale
            )
            compressed = compressed if global_view else []
            naive.append((b, len(compressed), extra))
            assert len(picked) == read[b].item() == budget_tokens(n, fraction, spec)
            for i, h in enumerate(heads):
                k_h, v_h = keys[:, kv_h], values[:, kv_h]
                ref = _naive_global_attention(qg[i], k_h, v_h, picked, compressed, 16, scale)
                torch.testing.assert_close(out[b, h].double(), ref, rtol=1e-5, atol=1e-5)
    scored = any(extra > 0 for _, _, extra in naive)
    for b, num_compressed, _ in naive:
        per_block = spec.score_width if summary != "sparq" else 16 * spec.channels / 64
        expected = (lens[b] // 16) * per_block * scored + 2 * num_compressed
        assert summaries_read[b].item() == expected


def test_minmax_bound_dominates_every_key_score():
    """The min/max score is an upper bound on q.k for every key of the block, and exact for
    a one-token block (why a block holding the best key is never ranked below it)."""
    torch.manual_seed(7)
    keys = torch.randn(50, 16, 1, 64)
    q = torch.randn(1, 1, 3, 64)
    summ = summarize_block(keys, keys, "minmax", False).unsqueeze(0)  # [1, 50, 2, 1, 64]
    bound = score_blocks(q, summ, "minmax")[0, 0]  # [3, 50]
    exact = torch.einsum("gd,ntd->gnt", q[0, 0], keys[:, :, 0]).amax(-1)
    assert (bound >= exact - 1e-4).all()
    one_token = summarize_block(keys[:, :1], keys[:, :1], "minmax", False).unsqueeze(0)
    one = score_blocks(q, one_token, "minmax")[0, 0]
    torch.testing.assert_close(one, torch.einsum("gd,nd->gn", q[0, 0], keys[:, 0, 0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_full_budget_is_close_to_float32(dtype):
    """bf16/fp16 caches and queries run the same path; at 100% they match fp32 dense."""
    lens = [70, 129]
    cache, tables, g = _paged(3, lens, 2, 32)
    q = torch.randn(2, 4, 64, generator=g)
    spec = SparseSpec((1.0,), 8, 8, 32)
    ref, _, _ = sparse_decode_attention(
        q, cache, _all_summaries(cache, spec), tables, torch.tensor(lens), 1.0, spec, 0.125
    )
    low = cache.to(dtype)
    out, _, _ = sparse_decode_attention(
        q.to(dtype), low, _all_summaries(low, spec), tables, torch.tensor(lens), 1.0, spec, 0.125
    )
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)


def test_summaries_written_on_fill_equal_direct_summaries():
    """Writing tokens one by one and summarising each score block when its last slot is
    written (what the runner asks for) leaves every full block's summary exact."""
    g = torch.Generator().manual_seed(11)
    cache = torch.zeros(2, 4, 16, 2, 64)
    summ = torch.full((8, 2, 2, 64), float("nan"))
    table = [2, 0, 3]
    for pos in range(40):  # 2.5 kv blocks of 16, score blocks of 8
        slot = table[pos // 16] * 16 + pos % 16
        cache.view(2, -1, 2, 64)[:, slot] = torch.randn(2, 2, 64, generator=g)
        if (pos + 1) % 8 == 0:
            ops.update_summaries(
                cache, summ, torch.tensor([slot // 8]), SparseSpec((0.5,), 8, 8, 8)
            )
    for pos in range(0, 40, 8):
        sub = (table[pos // 16] * 16 + pos % 16) // 8
        keys = cache[0].reshape(-1, 2, 64)[sub * 8 : sub * 8 + 8]
        torch.testing.assert_close(summ[sub], torch.stack((keys.amin(0), keys.amax(0))))


def test_imported_blocks_get_fresh_summaries():
    """KV copied in by a PD handoff (import_blocks) is summarised, so a decode engine that
    never computed the blocks still ranks them by their real keys."""
    cfg = ModelConfig(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=10,
    )  # fmt: skip
    spec = SparseSpec((0.5, 0.5), 8, 8, 8, "mean")
    cache = KVCache(cfg, num_blocks=5, block_size=16, dtype=torch.float32, sparse=spec)
    torch.manual_seed(5)
    data = torch.randn(2, *cache.full_block_shape)
    cache.import_blocks([4, 1], data)
    assert cache.summaries is not None
    for layer in range(2):
        for i, block in enumerate([4, 1]):
            keys = data[i, layer, 0].view(2, 8, 1, 32)
            torch.testing.assert_close(
                cache.summaries[layer, block * 2 : block * 2 + 2], keys.mean(1, keepdim=True)
            )


def test_profile_and_config_validation():
    """Budgets interpolate shallow -> deep; bad combinations are refused at construction."""
    sparse = SparseAttentionConfig(shallow_fraction=0.5, deep_fraction=0.1)
    fractions = sparse.fractions(5)
    assert fractions[0] == 0.5 and math.isclose(fractions[-1], 0.1)
    assert SparseAttentionConfig(layer_fractions=(0.3, 1.0)).fractions(2) == (0.3, 1.0)
    with pytest.raises(ValueError):
        SparseAttentionConfig(layer_fractions=(0.3,)).fractions(2)
    with pytest.raises(ValueError):
        EngineConfig(block_size=64, attention="sparse", sparse={"score_block_size": 48})
    with pytest.raises(ValueError):
        SparseSpec((0.5,), 0, 0, 16)  # no window: the partial block would be scored


def test_cuda_backend_is_refused_without_cuda_tensors():
    """Asking for the CUDA kernels on CPU tensors fails loudly; auto uses the reference."""
    x = torch.randn(3, 8)
    w13, w2 = torch.randn(2, 8, 8), torch.randn(2, 8, 4)
    ids, weights = torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
    with pytest.raises(RuntimeError):
        ops.fused_moe(x, w13, w2, weights, ids, backend="cuda")
    assert ops.fused_moe(x, w13, w2, weights, ids).shape == (3, 8)


def test_backend_from_environment(monkeypatch):
    """$DUALPATH_KERNELS picks the default backend; `auto` on CPU tensors is the reference
    (nothing is built), and a typo is refused."""
    x = torch.randn(3, 8)
    w13, w2 = torch.randn(2, 8, 8), torch.randn(2, 8, 4)
    ids, weights = torch.tensor([[0], [1], [1]]), torch.ones(3, 1)
    monkeypatch.setenv(env.KERNELS, "auto")
    assert torch.equal(ops.fused_moe(x, w13, w2, weights, ids), moe_ref(x, w13, w2, weights, ids))
    monkeypatch.setenv(env.KERNELS, "cuda")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        ops.fused_moe(x, w13, w2, weights, ids)
    monkeypatch.setenv(env.KERNELS, "cdua")
    with pytest.raises(ValueError, match="expected auto, reference or cuda"):
        ops.fused_moe(x, w13, w2, weights, ids)
