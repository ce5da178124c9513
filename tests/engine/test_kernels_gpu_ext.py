"""The compiled kernels (engine.kernels.build) one primitive at a time, against float64 torch
references written here from the primitives' spec (independent of engine/kernels/*.py).

Every reference is computed from the very same (already rounded) inputs, so the kernels'
only error is float32 arithmetic plus the rounding of their outputs (and, for fused_moe, of
the silu(gate) * up intermediate) to the input dtype. Tolerances: block_mass returns float32
from exact inputs, 1e-4 for every dtype; outputs stored in the input dtype get about two of
its rounding units (bf16 2^-8, fp16 2^-11 relative) on O(1) values; float32 1e-4.

Fresh outputs are poisoned through the caching allocator (a NaN tensor of the same size is
freed just before the call, so an unwritten element reads NaN); in-place summaries are
NaN-filled and unlisted rows must stay NaN.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from engine.kernels import build

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


@pytest.fixture(scope="module")
def ext():
    module = build.load_extension()
    assert module is not None
    return module


def _gen(*params: object) -> torch.Generator:
    """A generator seeded from the test's parameters (a different stream per case)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(params).encode()))


def _poison(numel: int, dtype: torch.dtype) -> None:
    """Leave a NaN-filled block of this size in the caching allocator's free list."""
    torch.full((numel,), float("nan"), dtype=dtype, device="cuda")
    torch.cuda.synchronize()


def _close(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert not out.isnan().any(), "unwritten (poisoned) or NaN output"
    torch.testing.assert_close(out.double().cpu(), ref.double().cpu(), rtol=tol, atol=tol)


# ---- block_mass ---------------------------------------------------------------------------


def _ref_block_mass(q, summ, phys, num_full, minmax, scale):
    q, summ = q.double().cpu(), summ.double().cpu()
    num_seqs, kv_heads, _, _ = q.shape
    out = torch.zeros(num_seqs, kv_heads, phys.shape[1], dtype=torch.float64)
    for b in range(num_seqs):
        nf = int(num_full[b])
        if nf == 0:
            continue
        rows = summ[phys[b, :nf].cpu()]  # [nf, S, KVH, D]
        for h in range(kv_heads):
            qh = q[b, h][:, None, :]  # [G, 1, D]
            if minmax:
                score = torch.maximum(qh * rows[None, :, 0, h], qh * rows[None, :, 1, h]).sum(-1)
            else:
                score = (qh * rows[None, :, 0, h]).sum(-1)
            out[b, h, :nf] = (score * scale).softmax(-1).sum(0)
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("minmax", [True, False])
@pytest.mark.parametrize(("head_dim", "width"), [(64, 37), (128, 700), (256, 5)])
def test_block_mass(ext, dtype, group, minmax, head_dim, width):
    g = _gen("mass", dtype, group, minmax, head_dim, width)
    kv_heads, num_sub, seqs = 2, 800, 4
    a, b = torch.randn(2, num_sub, kv_heads, head_dim, generator=g)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    summ = torch.stack([lo, hi] if minmax else [a], dim=1).to(dtype).cuda()
    q = torch.randn(seqs, kv_heads, group, head_dim, generator=g).to(dtype).cuda()
    num_full = torch.tensor([0, 1, width, max(1, width // 2)])
    phys = torch.randint(0, num_sub, (seqs, width), generator=g)  # garbage past num_full too
    scale = head_dim**-0.5
    ref = _ref_block_mass(q, summ, phys, num_full, minmax, scale)
    _poison(seqs * kv_heads * width, torch.float32)
    out = ext.block_mass(q, summ, phys.cuda(), num_full.cuda(), minmax, scale)
    assert out.dtype == torch.float32 and out.shape == (seqs, kv_heads, width)
    _close(out, ref, 1e-4)


# ---- sparse_paged_attention ---------------------------------------------------------------


def _attention_case(g, dtype, lens, group, head_dim, extras):
    """Scattered paged cache, per-(b, kvh) scattered selections, optional extra entries."""
    bs, sbs, kv_heads = 64, 16, 2
    sub = bs // sbs
    num_seqs, nsub = len(lens), [-(-n // sbs) for n in lens]
    widths = [-(-n // bs) for n in lens]
    num_blocks = sum(widths) + 3
    kv = torch.randn(2, num_blocks, bs, kv_heads, head_dim, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g)
    tables, at = [], 0
    for w in widths:
        tables.append(perm[at : at + w])
        at += w
    chosen = []
    for b in range(num_seqs):
        for _ in range(kv_heads):
            keep = torch.rand(nsub[b], generator=g) < 0.6
            keep[-1] = True  # the partial last block: at least one visible key
            ids = keep.nonzero().flatten()
            chosen.append(ids[torch.randperm(len(ids), generator=g)])
    slots = max(len(c) for c in chosen) + 1  # >= 1 padding slot per row
    garbage = 1 << 40  # never dereferenced: valid is False there
    phys = torch.full((num_seqs * kv_heads, slots), garbage)
    logical = torch.full((num_seqs * kv_heads, slots), garbage)
    valid = torch.zeros(num_seqs * kv_heads, slots, dtype=torch.bool)
    for row, ids in enumerate(chosen):
        table = tables[row // kv_heads]
        logical[row, : len(ids)] = ids
        phys[row, : len(ids)] = table[ids // sub] * sub + ids % sub
        valid[row, : len(ids)] = True
    shape = (num_seqs, kv_heads, slots)
    q = torch.randn(num_seqs, kv_heads * group, head_dim, generator=g).to(dtype)
    args = [q, kv, phys.view(shape), logical.view(shape), valid.view(shape), torch.tensor(lens)]
    extra = None
    if extras:
        width = max(nsub)
        ek, ev = torch.randn(2, num_seqs, kv_heads, width, head_dim, generator=g).to(dtype)
        on = torch.rand(num_seqs, kv_heads, width, generator=g) < 0.5
        bias = torch.full(on.shape, -math.inf).masked_fill(on, math.log(sbs))
        extra = (ek, ev, bias)
    return args, sbs, extra


def _ref_attention(q, kv, phys, logical, valid, lens, sbs, scale, extra):
    q, keys, vals = q.double(), kv[0].double(), kv[1].double()
    num_seqs, num_heads, head_dim = q.shape
    kv_heads = keys.shape[2]
    group = num_heads // kv_heads
    keys, vals = keys.reshape(-1, kv_heads, head_dim), vals.reshape(-1, kv_heads, head_dim)
    out = torch.empty(num_seqs, num_heads, head_dim, dtype=torch.float64)
    offsets = torch.arange(sbs)
    for b in range(num_seqs):
        for h in range(kv_heads):
            pos = logical[b, h, :, None] * sbs + offsets
            vis = valid[b, h, :, None] & (pos < lens[b])
            rows = (phys[b, h, :, None] * sbs + offsets)[vis]
            k, v, bias = keys[rows, h], vals[rows, h], torch.zeros(len(rows), dtype=torch.float64)
            if extra is not None:
                ek, ev, eb = extra
                on = eb[b, h] != -math.inf
                k = torch.cat([k, ek[b, h][on].double()])
                v = torch.cat([v, ev[b, h][on].double()])
                bias = torch.cat([bias, eb[b, h][on].double()])
            heads = slice(h * group, (h + 1) * group)
            logits = scale * q[b, heads] @ k.T + bias
            out[b, heads] = logits.softmax(-1) @ v
    return out


def _run_attention(ext, dtype, lens, group, head_dim, extras):
    g = _gen("attn", dtype, lens, group, head_dim, extras)
    args, sbs, extra = _attention_case(g, dtype, lens, group, head_dim, extras)
    scale = head_dim**-0.5
    ref = _ref_attention(*args, sbs, scale, extra)
    cuda_args = [a.cuda() for a in args]
    cuda_extra = [e.cuda() for e in extra] if extra is not None else [None, None, None]
    _poison(args[0].numel(), dtype)
    out = ext.sparse_paged_attention(*cuda_args, sbs, scale, *cuda_extra)
    assert out.dtype == dtype and out.shape == args[0].shape
    _close(out, ref, TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("lens", [[1, 65], [4096], [8192, 65, 1]])
@pytest.mark.parametrize("extras", [False, True])
def test_sparse_paged_attention(ext, dtype, group, lens, extras):
    _run_attention(ext, dtype, lens, group, 128, extras)


@pytest.mark.parametrize(("head_dim", "group"), [(64, 8), (80, 3), (256, 4), (256, 32)])
def test_sparse_paged_attention_head_dims(ext, head_dim, group):
    _run_attention(ext, torch.bfloat16, [300, 2000], group, head_dim, True)


def test_sparse_paged_attention_all_extras_masked(ext):
    """Extra entries present but every bias -inf: the cache tokens alone."""
    g = _gen("masked")
    args, sbs, (ek, ev, bias) = _attention_case(g, torch.float32, [700], 3, 64, True)
    bias = torch.full_like(bias, -math.inf)
    ref = _ref_attention(*args, sbs, 0.125, None)
    cuda = [a.cuda() for a in (*args, ek, ev, bias)]
    out = ext.sparse_paged_attention(*cuda[:6], sbs, 0.125, *cuda[6:])
    _close(out, ref, 1e-4)


def test_sparse_paged_attention_rejects_bad_head_dim(ext):
    q = torch.randn(1, 2, 12, device="cuda")
    kv = torch.randn(2, 1, 16, 1, 12, device="cuda")
    idx = torch.zeros(1, 1, 1, dtype=torch.long, device="cuda")
    valid = torch.ones(1, 1, 1, dtype=torch.bool, device="cuda")
    lens = torch.tensor([3], device="cuda")
    with pytest.raises(RuntimeError, match="multiple of 8"):
        ext.sparse_paged_attention(q, kv, idx, idx, valid, lens, 16, 1.0)


# ---- update_summaries ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("minmax", "means"), [(True, False), (True, True), (False, False), (False, True)]
)
@pytest.mark.parametrize(("sbs", "head_dim"), [(16, 128), (64, 64), (8, 80)])
def test_update_summaries(ext, dtype, minmax, means, sbs, head_dim):
    g = _gen("summ", dtype, minmax, means, sbs, head_dim)
    num_blocks, bs, kv_heads = 6, 64, 3
    kv = torch.randn(2, num_blocks, bs, kv_heads, head_dim, generator=g).to(dtype)
    num_sub = num_blocks * bs // sbs
    width = (4 if means else 2) if minmax else (2 if means else 1)
    ids = torch.randperm(num_sub, generator=g)[: num_sub // 2]
    k, v = kv.double().reshape(2, num_sub, sbs, kv_heads, head_dim)[:, ids]
    parts = [k.amin(1), k.amax(1)] if minmax else []
    parts += [k.mean(1)] if (means or not minmax) else []
    parts += [v.mean(1)] if means else []
    ref = torch.stack(parts, dim=1)  # [m, S, KVH, D]
    summ = torch.full((num_sub, width, kv_heads, head_dim), float("nan"), dtype=dtype).cuda()
    ext.update_summaries(kv.cuda(), summ, ids.cuda(), minmax, means)
    summ = summ.cpu()
    untouched = torch.ones(num_sub, dtype=torch.bool)
    untouched[ids] = False
    assert summ[untouched].isnan().all(), "a row that was not listed was written"
    got = summ[ids]
    if minmax:  # min / max are exact in any dtype
        assert torch.equal(got[:, :2], ref[:, :2].to(dtype))
    _close(got, ref, TOL[dtype] if dtype != torch.float32 else 1e-5)


# ---- fused_moe ----------------------------------------------------------------------------


def _ref_moe(x, w13, w2, weights, ids):
    x, w13, w2 = x.double(), w13.double(), w2.double()
    inter = w2.shape[2]
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        tok, choice = (ids == e).nonzero(as_tuple=True)
        gate, up = (x[tok] @ w13[e].T).split(inter, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ w2[e].T
        out.index_add_(0, tok, y * weights[tok, choice].double()[:, None])
    return out


def _moe_case(g, dtype, tokens, experts, top_k, hidden, inter, ids=None):
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=g) / inter**0.5
    if ids is None:
        ids = torch.rand(tokens, experts, generator=g).argsort(-1)[:, :top_k]
    weights = torch.randn(tokens, top_k, generator=g).softmax(-1)
    return [t.cuda() for t in (x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids)]


def _check_moe(ext, dtype, case):
    ref = _ref_moe(*case)
    tokens, hidden = case[0].shape
    _poison(tokens * hidden, dtype)
    out = ext.fused_moe(*case)
    assert out.dtype == dtype and out.shape == (tokens, hidden)
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    _close(out, ref, tol)
    assert torch.equal(out, ext.fused_moe(*case)), "not deterministic"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "hidden", "inter"),
    [
        (1, 8, 2, 128, 96),
        (1, 64, 6, 256, 128),
        (5, 64, 2, 128, 64),  # most experts empty
        (257, 64, 6, 128, 96),
        (200, 256, 8, 256, 64),
        (70, 16, 4, 200, 40),  # hidden / inter not multiples of the 64 x 32 tiles
    ],
)
def test_fused_moe(ext, dtype, tokens, experts, top_k, hidden, inter):
    g = _gen("moe", dtype, tokens, experts, top_k, hidden, inter)
    _check_moe(ext, dtype, _moe_case(g, dtype, tokens, experts, top_k, hidden, inter))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 2])
def test_fused_moe_all_tokens_on_one_expert(ext, dtype, top_k):
    g = _gen("one-expert", dtype, top_k)
    tokens = 300  # 5 row tiles of one expert
    ids = torch.tensor([3, 5][:top_k]).expand(tokens, top_k).contiguous()
    _check_moe(ext, dtype, _moe_case(g, dtype, tokens, 8, top_k, 128, 96, ids=ids))
