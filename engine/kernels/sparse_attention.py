"""Top-k block-sparse decode attention (DSpark / Quest style): the torch reference = the spec.

For each decode query, layer and KV head (a GQA group shares one selection):

1. Block summaries. The paged cache is cut into *score blocks* of `score_block_size` tokens
   (a divisor of the KV block size). A full score block is summarised once, when it fills:
   `minmax` keeps the element-wise min and max of its keys, `mean` their mean. With the
   global view on, the mean key and mean value are kept as well (`SparseSpec` layout).
2. Scoring (`block_mass`). `minmax` bounds q.k over the block from above:
   sum_d max(q_d*min_d, q_d*max_d) (exact for a single-token block); `mean` uses q.mean.
   Each query head turns its block scores into a softmax over the blocks (an estimate of
   the attention mass each block gets); the heads of a GQA group add their masses, and
   that sum ranks the group's blocks.
3. Selection. Always the first `ceil(num_sink_tokens / sbs)` blocks (sinks) and every block
   that overlaps the last `window_tokens` tokens (so the partial, unsummarised last block is
   always read); then the top-ranked remaining full blocks while the tokens read stay within
   `ceil(fraction * context_len)`. A fraction >= 1 selects every block without scoring.
4. Global view (DeepSeek-V4's heavily compressed attention, training-free): every full
   block *not* selected still takes part as one compressed entry, its mean key and mean
   value with logit bias log(sbs), so sum_i exp(q.k_i) v_i over the block is replaced by
   sbs * exp(q.mean_k) * mean_v. It costs two vectors per unselected block.
5. Attention (`sparse_paged_attention`). Exact softmax attention of the query over the
   selected tokens (gathered from the paged cache through the block table) and the
   compressed entries, in one softmax.

With every block selected the keys are the full context in order and there is no
compressed entry, so the result equals dense attention (tests check the naive formula).
`block_mass` and `sparse_paged_attention` are the two kernel primitives (ops.py dispatches
them to CUDA where built); selection between them is plain torch (top-k, sort).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

SummaryMode = Literal["minmax", "mean", "sparq"]


@dataclass(frozen=True, slots=True)
class SparseSpec:
    """The resolved knobs of sparse decode attention (one per engine).

    Summary layout per score block and KV head, `summary_width` vectors: minmax `[min, max]`,
    mean `[mean_k]`, sparq none (it ranks by `channels` channels of the keys themselves);
    with `global_view` the mean key and value are added: minmax `[min, max, mean_k, mean_v]`,
    mean and sparq `[mean_k, mean_v]`.
    """

    fractions: tuple[float, ...]  # per layer: budget as a fraction of the context read
    num_sink_tokens: int
    window_tokens: int
    score_block_size: int
    summary: SummaryMode = "minmax"
    global_view: bool = False
    channels: int = 8  # sparq: key channels read per token to rank blocks

    def __post_init__(self) -> None:
        if self.window_tokens < 1:
            raise ValueError("window_tokens must be >= 1 (the last, partial block is never scored)")
        if self.score_block_size < 1 or any(f <= 0 for f in self.fractions):
            raise ValueError("score_block_size >= 1 and fractions > 0 are required")

    @property
    def score_width(self) -> int:
        """Summary vectors read to score one block."""
        return {"minmax": 2, "mean": 1, "sparq": 0}[self.summary]

    @property
    def summary_width(self) -> int:
        """Summary vectors kept per score block and KV head."""
        if not self.global_view:
            return self.score_width
        return self.score_width + (1 if self.summary == "mean" else 2)  # + [mean_k,] mean_v

    @property
    def mean_k_index(self) -> int:
        return 2 if self.summary == "minmax" else 0


@dataclass(slots=True)
class SparseStats:
    """Tokens each layer read vs the context it would read dense, summed over decode steps.

    Kept as device tensors (no sync per layer); read them with `.cpu()` after the step.
    """

    tokens_read: torch.Tensor  # [layers] float64
    tokens_context: torch.Tensor  # [layers] float64
    summaries_read: torch.Tensor  # [layers] float64: summary vectors read, per KV head

    @classmethod
    def zeros(cls, num_layers: int, device: torch.device | str = "cpu") -> SparseStats:
        z = torch.zeros(num_layers, dtype=torch.float64, device=device)
        return cls(z.clone(), z.clone(), z.clone())

    def kv_fraction(self, include_summaries: bool = True) -> float:
        """Bytes of K+V (+ key summaries) read over the bytes dense attention reads."""
        read = self.tokens_read.sum().item() * 2
        if include_summaries:
            read += self.summaries_read.sum().item()
        dense = self.tokens_context.sum().item() * 2
        return read / dense if dense else 0.0


class Primitives(Protocol):
    """The kernel entry points sparse_decode_attention is built from (see below)."""

    def block_mass(self, *args: object) -> torch.Tensor: ...
    def channel_mass(self, *args: object) -> torch.Tensor: ...
    def sparse_paged_attention(self, *args: object) -> torch.Tensor: ...


def summarize_block(
    keys: torch.Tensor, values: torch.Tensor, mode: SummaryMode, means: bool
) -> torch.Tensor:
    """Summaries [n, S, KVH, D] of full score blocks' keys/values [n, sbs, KVH, D]."""
    parts = [keys.amin(dim=1), keys.amax(dim=1)] if mode == "minmax" else []
    if mode == "mean" or means:
        parts.append(keys.float().mean(dim=1).to(keys.dtype))
    if means:
        parts.append(values.float().mean(dim=1).to(values.dtype))
    return torch.stack(parts, dim=1)


def update_summaries(
    kv_cache: torch.Tensor,
    summaries: torch.Tensor,
    sub_block_ids: torch.Tensor,
    mode: SummaryMode,
    means: bool = False,
) -> None:
    """Recompute the summaries of score blocks `sub_block_ids` [m] from the cache's K/V.

    Args:
        kv_cache: one layer `[2, num_blocks, block_size, KVH, D]`.
        summaries: one layer `[num_blocks * blocks_per_kv_block, S, KVH, D]`, written in place.
        sub_block_ids: flat score-block ids (kv block id * blocks_per_kv_block + sub index).
    """
    if sub_block_ids.numel() == 0 or summaries.shape[1] == 0:
        return
    _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
    num_sub = summaries.shape[0]
    sbs = num_blocks * block_size // num_sub
    kv = kv_cache.reshape(2, num_sub, sbs, kv_heads, head_dim).index_select(1, sub_block_ids)
    summaries.index_copy_(0, sub_block_ids, summarize_block(kv[0], kv[1], mode, means))


def _logical_to_physical(
    block_tables: torch.Tensor, logical: torch.Tensor, sub_per_block: int
) -> torch.Tensor:
    """Flat score-block ids for logical score-block indices [B, ...] via tables [B, nb]."""
    num_seqs = logical.shape[0]
    flat = logical.reshape(num_seqs, -1)
    phys = block_tables.gather(1, flat // sub_per_block) * sub_per_block + flat % sub_per_block
    return phys.view_as(logical)


def score_blocks(q: torch.Tensor, block_summaries: torch.Tensor, mode: SummaryMode) -> torch.Tensor:
    """Per-head block scores [B, KVH, G, n] (float32) for queries q [B, KVH, G, D] against
    summaries [B, n, S, KVH, D]: the min/max upper bound of q.k, or q.mean_k."""
    summ = block_summaries.float().permute(0, 3, 2, 1, 4)  # [B, KVH, S, n, D]
    qf = q.float()
    if mode == "minmax":
        lo, hi = summ[:, :, 0], summ[:, :, 1]
        return qf.clamp(min=0) @ hi.transpose(-1, -2) + qf.clamp(max=0) @ lo.transpose(-1, -2)
    return qf @ summ[:, :, 0].transpose(-1, -2)


def channel_mass(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    phys: torch.Tensor,
    num_full: torch.Tensor,
    sbs: int,
    channels: int,
    scale: float,
) -> torch.Tensor:
    """Estimated attention mass [B, KVH, n] (float32) of each full score block from `channels`
    of the D key channels of every one of its tokens (SparQ-style, one channel set per GQA
    group so each key is read once): the group's largest sum_g |q_gd|; each head's partial
    logits q[c].k[c] are scaled by sqrt(|q|_1 / |q[c]|_1) to keep the full logits' spread,
    softmaxed over all tokens of the full blocks, summed per block and over the group.

    Args:
        q: [B, KVH, G, D]; kv_cache: one layer `[2, num_blocks, block_size, KVH, D]`;
        phys: [B, n] flat score-block ids (only j < num_full[b] are read).
    """
    num_seqs, width = phys.shape
    kv_heads, head_dim = kv_cache.shape[3], kv_cache.shape[4]
    qf = q.float()
    top = qf.abs().sum(2).topk(min(channels, head_dim), dim=-1).indices  # [B, KVH, r]
    keys = kv_cache[0].reshape(-1, sbs, kv_heads, head_dim).index_select(0, phys.reshape(-1))
    keys = keys.view(num_seqs, width * sbs, kv_heads, head_dim).transpose(1, 2)  # [B,KVH,T,D]
    k_sel = keys.gather(-1, top[:, :, None, :].expand(-1, -1, width * sbs, -1)).float()
    q_sel = qf.gather(-1, top[:, :, None, :].expand_as(qf[..., : top.shape[-1]]))
    spread = (qf.abs().sum(-1) / q_sel.abs().sum(-1).clamp(min=1e-20)).sqrt()  # [B, KVH, G]
    scores = (q_sel @ k_sel.transpose(-1, -2)) * (scale * spread)[..., None]  # [B,KVH,G,T]
    is_full = torch.arange(width * sbs, device=q.device) < (num_full.to(q.device) * sbs)[:, None]
    scores = scores.masked_fill(~is_full[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).nan_to_num(0.0)
    return probs.view(*probs.shape[:3], width, sbs).sum(dim=(2, 4))


def block_mass(
    q: torch.Tensor,
    summaries: torch.Tensor,
    phys: torch.Tensor,
    num_full: torch.Tensor,
    mode: SummaryMode,
    scale: float,
) -> torch.Tensor:
    """Estimated attention mass [B, KVH, n] (float32) of each full score block, summed over
    the query heads of each GQA group.

    Args:
        q: [B, KVH, G, D]; summaries: one layer [num_sub, S, KVH, D];
        phys: [B, n] flat score-block ids in logical order (only j < num_full[b] are read);
        num_full: [B] full score blocks per sequence (the rest get mass 0).
    """
    num_seqs, width = phys.shape
    summ = summaries.index_select(0, phys.reshape(-1)).view(num_seqs, width, *summaries.shape[1:])
    scores = score_blocks(q, summ, mode)
    is_full = torch.arange(width, device=q.device) < num_full.to(q.device)[:, None]
    scores = (scores * scale).masked_fill(~is_full[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1).nan_to_num(0.0).sum(dim=2)


def sparse_paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    phys: torch.Tensor,
    logical: torch.Tensor,
    valid: torch.Tensor,
    context_lens: torch.Tensor,
    sbs: int,
    scale: float,
    extra_k: torch.Tensor | None = None,
    extra_v: torch.Tensor | None = None,
    extra_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of q [B, H, D] over selected score blocks plus optional extra entries.

    Args:
        kv_cache: one layer `[2, num_blocks, block_size, KVH, D]`.
        phys / logical / valid: [B, KVH, M] flat score-block ids, their logical indices, and
            which of the M slots are real; token t of a block is visible while
            logical * sbs + t < context_lens[b].
        extra_k / extra_v: [B, KVH, C, D] compressed entries; extra_bias [B, KVH, C] float32
            is added to their logits (-inf: absent).

    Returns:
        [B, H, D] in q's dtype.
    """
    num_seqs, num_heads, head_dim = q.shape
    kv_heads, num_read = phys.shape[1], phys.shape[2]
    queries = q.view(num_seqs, kv_heads, num_heads // kv_heads, head_dim)
    # NOTE: one index_select of whole (token, head) rows of K and V together: a plain row
    # copy, ~10x faster on CPU than advanced indexing over (block, :, head).
    heads = torch.arange(kv_heads, device=q.device)[None, :, None, None]
    offsets = torch.arange(sbs, device=q.device)
    rows = ((phys[..., None] * sbs + offsets) * kv_heads + heads).reshape(-1)
    kv = kv_cache.view(2, -1, head_dim).index_select(1, rows)
    keys, values = kv.view(2, num_seqs, kv_heads, num_read * sbs, head_dim)
    pos = logical[..., None] * sbs + offsets  # [B, KVH, M, sbs]
    visible = valid[..., None] & (pos < context_lens.to(q.device)[:, None, None, None])
    mask = visible.reshape(num_seqs, kv_heads, 1, num_read * sbs)
    if extra_k is not None and extra_v is not None and extra_bias is not None:
        keys = torch.cat((keys, extra_k.to(keys.dtype)), dim=2)
        values = torch.cat((values, extra_v.to(values.dtype)), dim=2)
        zeros = torch.zeros(mask.shape, dtype=torch.float32, device=q.device)
        bias = zeros.masked_fill(~mask, float("-inf"))
        mask = torch.cat((bias, extra_bias.float()[:, :, None, :]), dim=-1).to(q.dtype)
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
    return out.reshape(num_seqs, num_heads, head_dim)


def sparse_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    summaries: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    fraction: float,
    spec: SparseSpec,
    scale: float,
    prims: Primitives | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode attention of q [B, H, D] over the selected blocks of one layer's paged cache.

    Args:
        kv_cache: `[2, num_blocks, block_size, KVH, D]` (this step's K/V already written).
        summaries: `[num_blocks * block_size / sbs, S, KVH, D]`, current for full blocks.
        block_tables: [B, nb] kv block ids (padding entries are never read unmasked).
        context_lens: [B] tokens of context, the current token included.
        fraction: this layer's budget (tokens read / context tokens).
        prims: where `block_mass` / `sparse_paged_attention` come from (default: here).

    Returns:
        (output [B, H, D] in q's dtype, tokens read [B], summary vectors read [B]; both
        per KV head, the same for every head).
    """
    prims = prims or _REFERENCE
    num_seqs, num_heads, head_dim = q.shape
    block_size, kv_heads = kv_cache.shape[2], kv_cache.shape[3]
    sbs = spec.score_block_size
    if block_size % sbs:
        raise ValueError(f"score_block_size {sbs} must divide the KV block size {block_size}")
    sub_per_block = block_size // sbs
    queries = q.view(num_seqs, kv_heads, num_heads // kv_heads, head_dim)
    dev = q.device
    lens = context_lens.to(dev)
    num_sub = (lens + sbs - 1) // sbs  # [B] score blocks holding context
    width = int(num_sub.max().item())
    j = torch.arange(width, device=dev)
    in_ctx = j < num_sub[:, None]  # [B, n]
    first_window = ((lens - spec.window_tokens).clamp(min=0) // sbs)[:, None]
    forced = in_ctx & ((j < -(-spec.num_sink_tokens // sbs)) | (j >= first_window))
    # NOTE: window_tokens >= 1 forces the block of the last token, so every candidate is a
    # full block whose summary was written when it filled.
    candidate = in_ctx & ~forced
    block_tokens = (lens[:, None] - j * sbs).clamp(0, sbs)  # [B, n] tokens in each block
    budget = torch.ceil(lens.double() * fraction).long()
    num_extra = (budget - (block_tokens * forced).sum(1)).clamp(min=0) // sbs  # [B]
    last = block_tables.shape[1] * sub_per_block - 1
    logical_all = j.clamp(max=last).expand(num_seqs, width)
    phys_all = _logical_to_physical(block_tables, logical_all, sub_per_block)  # [B, n]
    scored = fraction < 1.0 and not bool((num_extra >= candidate.sum(1)).all())
    selected = (forced if scored else forced | candidate).unsqueeze(1)
    selected = selected.expand(num_seqs, kv_heads, width)
    k = min(int(num_extra.max().item()), width) if scored else 0
    if k > 0:
        if spec.summary == "sparq":
            mass = prims.channel_mass(
                queries, kv_cache, phys_all, lens // sbs, sbs, spec.channels, scale
            )
        else:
            mass = prims.block_mass(queries, summaries, phys_all, lens // sbs, spec.summary, scale)
        mass = mass.masked_fill(~candidate[:, None, :], float("-inf"))
        top = mass.topk(k, dim=-1).indices  # [B, KVH, k]
        is_candidate = candidate[:, None, :].expand_as(mass).gather(-1, top)
        keep = (torch.arange(k, device=dev) < num_extra[:, None, None]) & is_candidate
        selected = selected | torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, top, keep)
    counts = selected.sum(-1)  # [B, KVH]; equal over heads
    order = torch.sort((~selected).to(torch.uint8), dim=-1, stable=True).indices
    idx = order[..., : int(counts.max().item())]
    valid = torch.arange(idx.shape[-1], device=dev) < counts[..., None]
    phys = _logical_to_physical(block_tables, idx, sub_per_block)  # [B, KVH, M]
    extra: tuple[torch.Tensor | None, ...] = (None, None, None)
    # ranking reads (in D-vectors): score_width per full block, or `channels` per full token
    per_block = spec.score_width if spec.summary != "sparq" else sbs * spec.channels / head_dim
    summary_vectors = (lens // sbs) * per_block * int(k > 0)
    if spec.global_view and scored:
        compressed = candidate[:, None, :] & ~selected  # [B, KVH, n]
        summ = summaries.index_select(0, phys_all.reshape(-1))
        summ = summ.view(num_seqs, width, *summaries.shape[1:]).permute(0, 3, 2, 1, 4)
        bias = torch.full(compressed.shape, math.log(sbs), dtype=torch.float32, device=dev)
        bias = bias.masked_fill(~compressed, -math.inf)  # [B, KVH, n]
        extra = (summ[:, :, spec.mean_k_index], summ[:, :, -1], bias)  # [B, KVH, n, D] each
        summary_vectors = summary_vectors + 2 * compressed[:, 0].sum(-1)
    out = prims.sparse_paged_attention(q, kv_cache, phys, idx, valid, lens, sbs, scale, *extra)
    tokens_read = (block_tokens.gather(1, idx[:, 0]) * valid[:, 0]).sum(-1)
    return out, tokens_read, summary_vectors


def budget_tokens(context_len: int, fraction: float, spec: SparseSpec) -> int:
    """Tokens the selection reads for one sequence (the host-side twin of the selection)."""
    sbs = spec.score_block_size
    num_sub = -(-context_len // sbs)
    sinks = min(-(-spec.num_sink_tokens // sbs), num_sub)
    first_window = max(0, context_len - spec.window_tokens) // sbs
    forced = set(range(sinks)) | set(range(first_window, num_sub))
    forced_tokens = sum(min(sbs, context_len - j * sbs) for j in forced)
    if fraction >= 1.0:
        return context_len
    extra = max(0, math.ceil(context_len * fraction) - forced_tokens) // sbs
    return forced_tokens + min(extra, num_sub - len(forced)) * sbs


_REFERENCE: Primitives = sys.modules[__name__]  # type: ignore[assignment]
