"""Paged attention over the block KV cache (torch path; runs on CPU and CUDA).

The cache of one layer is `[2, num_blocks, block_size, kv_heads, head_dim]`. New tokens'
K/V are written to their slots first, then every query reads its context through its
block table, so a prefix-cache hit and freshly computed KV are read the same way.
GQA is handled by folding query heads into [kv_heads, group] instead of repeating K/V.

With a `SparseContext`, decode queries read only their selected blocks (sinks, window and
top-k by key summaries; engine/kernels/sparse_attention.py) and the summaries of score
blocks that fill are written right after the new K/V. Prefill stays dense.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.forward_context import AttentionMetadata, SparseContext
from engine.kernels import ops

# Decode attention over bf16/fp16 KV on CPU uses bmm + softmax for a batch of several
# sequences, and for one sequence from this many context tokens; below it, and on CUDA,
# SDPA's kernel.
BMM_MIN_CONTEXT = 512


def write_kv(
    kv_cache: torch.Tensor, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Store k, v [T, KVH, D] into the cache at flat slots [T]."""
    _, num_blocks, block_size, kv_heads, head_dim = kv_cache.shape
    flat = kv_cache.view(2, num_blocks * block_size, kv_heads, head_dim)
    flat[0].index_copy_(0, slot_mapping, k.to(kv_cache.dtype))
    flat[1].index_copy_(0, slot_mapping, v.to(kv_cache.dtype))


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sparse: SparseContext | None = None,
    layer: int = 0,
) -> torch.Tensor:
    """Causal attention of q [T, H, D] over the cache after writing k, v [T, KVH, D].

    Args:
        sparse: set for sparse decode attention; `layer` picks its budget and summaries.

    Returns:
        [T, H * D] attention output in q's dtype (attention runs in the cache's dtype).
    """
    write_kv(kv_cache, meta.slot_mapping, k, v)
    out_dtype = q.dtype
    q = q.to(kv_cache.dtype)
    if sparse is not None and meta.filled_sub_blocks is not None:
        ops.update_summaries(kv_cache, sparse.summaries[layer], meta.filled_sub_blocks, sparse.spec)
    num_tokens, num_heads, head_dim = q.shape
    kv_heads = kv_cache.shape[3]
    group = num_heads // kv_heads
    sparse_decode = sparse is not None and sparse.spec.fractions[layer] < 1
    if meta.decode_only and not sparse_decode:  # a pure decode step: no scatter into `out`
        attn = _dense_decode(q, kv_cache, meta, scale, sparse, layer)
        return attn.reshape(num_tokens, num_heads * head_dim).to(out_dtype)
    out = torch.empty_like(q)

    # NOTE: a layer whose budget is the whole context reads it through the dense path.
    if meta.decode_token_idx is not None and sparse_decode:
        assert sparse is not None
        out[meta.decode_token_idx] = _sparse_decode(q, kv_cache, meta, scale, sparse, layer)
    elif meta.decode_token_idx is not None and meta.decode_real_rows is not None:
        real = meta.decode_real_rows
        attn = _dense_decode(q, kv_cache, meta, scale, sparse, layer)
        out[meta.decode_token_idx[real]] = attn[real]
    elif meta.decode_token_idx is not None:
        out[meta.decode_token_idx] = _dense_decode(q, kv_cache, meta, scale, sparse, layer)

    for span in meta.prefills:
        table = span.block_table.unsqueeze(0)
        keys, values = _gather_kv(kv_cache, table, span.context_len)[:, 0].transpose(1, 2)
        rows = slice(span.query_start, span.query_start + span.query_len)
        queries = q[rows].transpose(0, 1)  # [H, n, D]
        # NOTE: inputs must be 4-D: CPU SDPA takes the flash kernel only for 4-D tensors and
        # falls back to the O(n^2)-memory math kernel for 3-D ones (6x slower at 2k tokens).
        attn = F.scaled_dot_product_attention(
            queries[None],
            keys[None],
            values[None],
            attn_mask=span.mask,
            is_causal=span.mask is None,
            scale=scale,
            enable_gqa=group > 1,
        )[0]
        out[rows] = attn.transpose(0, 1)
    return out.view(num_tokens, num_heads * head_dim).to(out_dtype)


def _dense_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sparse: SparseContext | None,
    layer: int,
) -> torch.Tensor:
    """Attention of the decode queries over their whole context: [B, H, D]."""
    if sparse is not None and sparse.stats is not None:
        lens = meta.decode_context_lens
        assert lens is not None
        sparse.stats.tokens_read[layer] += lens.sum()
        sparse.stats.tokens_context[layer] += lens.sum()
    tables = meta.decode_block_tables
    assert tables is not None and meta.decode_token_idx is not None
    num_decodes = tables.shape[0]
    num_heads, head_dim = q.shape[1:]
    kv_heads = kv_cache.shape[3]
    # [B, max_blocks, bs, KVH, D] -> [B, KVH, L, D]
    keys, values = _gather_kv(kv_cache, tables, meta.decode_context_len).transpose(2, 3)
    rows = q if meta.decode_only else q[meta.decode_token_idx]
    group = num_heads // kv_heads
    q_len = meta.decode_query_len
    mask = meta.decode_mask
    if q_len == 1:
        queries = rows.view(num_decodes, kv_heads, group, head_dim)
    else:  # a sequence's queries side by side with its head group: [B, KVH, q_len * G, D]
        queries = rows.view(num_decodes, q_len, kv_heads, group, head_dim).transpose(1, 2)
        queries = queries.reshape(num_decodes, kv_heads, q_len * group, head_dim)
        if mask is not None:
            mask = mask.unsqueeze(3).expand(-1, -1, -1, group, -1).flatten(2, 3)
    context = meta.decode_context_len
    cpu_low_precision = keys.device.type == "cpu" and keys.dtype != torch.float32
    # NOTE: decided on the context without drafts: the kernel a plain step would take.
    # Several sequences take bmm at any length: SDPA's rounding would depend on what else
    # is in the batch (the padded length), bmm's does not.
    plain_context = meta.decode_plain_context_len or context
    if not cpu_low_precision or num_decodes == 1 and plain_context < BMM_MIN_CONTEXT:
        if q_len > 1 and num_decodes == 1:
            return _rowwise_decode(rows, keys, values, meta, scale, kv_heads, group)
        attn = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
        return _decode_rows(attn, num_decodes, q_len, kv_heads, group, head_dim)
    # NOTE: CPU SDPA on bf16 is 1.8-3x slower than these three ops for a single query per
    # head group (measured, 1 thread: batch 8 x 128 tokens 167 vs 93 us, 32 x 128: 667 vs
    # 226); it wins only for one sequence's short context, hence the threshold. Their
    # result for a query does not depend on the key length it is padded to nor on how many
    # queries share the call (0 of 300 random shapes differ; SDPA's did on 17 of 200): a
    # sequence decodes the same whatever else is in the batch, and a drafted row rounds
    # exactly as the plain decode of its position.
    attn = _bmm_attention(queries, keys, values, mask, scale)
    return _decode_rows(attn, num_decodes, q_len, kv_heads, group, head_dim)


def _bmm_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Queries [B, KVH, W, D] over keys/values [B, KVH, L, D] with bmm + softmax."""
    batch, kv_heads, width, head_dim = queries.shape
    context = keys.shape[2]
    flat_keys = keys.reshape(batch * kv_heads, context, head_dim)
    scores = torch.bmm(queries.reshape(-1, width, head_dim), flat_keys.transpose(1, 2))
    scores = scores.view(batch, kv_heads, width, context)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float() * scale, dim=-1).to(values.dtype)
    attn = torch.bmm(probs.view(-1, width, context), values.reshape(-1, context, head_dim))
    return attn.view(batch, kv_heads, width, head_dim)


def _rowwise_decode(
    rows: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    kv_heads: int,
    group: int,
) -> torch.Tensor:
    """One sequence's verify queries [q_len, H, D], each in its own SDPA call over exactly
    its own context: SDPA's rounding depends on the padded key length and on the number of
    queries in a call, so this is how a drafted row gets the very logits a plain decode of
    its position gets (greedy speculation then keeps the output token for token)."""
    assert meta.decode_real_rows is None
    q_len, num_heads, head_dim = rows.shape
    context = meta.decode_context_len
    low_precision = keys.device.type == "cpu" and keys.dtype != torch.float32
    out = []
    for j in range(q_len):
        length = context - (q_len - 1 - j)
        query = rows[j].view(1, kv_heads, group, head_dim)
        k, v = keys[:, :, :length], values[:, :, :length]
        if low_precision and length >= BMM_MIN_CONTEXT:  # a plain step here takes bmm
            attn = _bmm_attention(query, k, v, None, scale)
        else:
            attn = F.scaled_dot_product_attention(query, k, v, scale=scale)
        out.append(attn.reshape(1, num_heads, head_dim))
    return torch.cat(out)


def _decode_rows(
    attn: torch.Tensor, num_decodes: int, q_len: int, kv_heads: int, group: int, head_dim: int
) -> torch.Tensor:
    """[B, KVH, q_len * G, D] attention back to one row per query: [B * q_len, H, D]."""
    if q_len == 1:
        return attn.reshape(num_decodes, kv_heads * group, head_dim)
    attn = attn.reshape(num_decodes, kv_heads, q_len, group, head_dim).transpose(1, 2)
    return attn.reshape(num_decodes * q_len, kv_heads * group, head_dim)


def _sparse_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sparse: SparseContext,
    layer: int,
) -> torch.Tensor:
    """Sparse attention of the decode queries [B, H, D]; counts what was read."""
    lens = meta.decode_context_lens
    assert lens is not None and meta.decode_block_tables is not None
    fraction = sparse.spec.fractions[layer]
    attn, tokens_read, summaries_read = ops.sparse_decode_attention(
        q[meta.decode_token_idx],
        kv_cache,
        sparse.summaries[layer],
        meta.decode_block_tables,
        lens,
        fraction,
        sparse.spec,
        scale,
    )
    stats = sparse.stats
    if stats is not None:
        stats.tokens_read[layer] += tokens_read.sum()
        stats.tokens_context[layer] += lens.sum()
        stats.summaries_read[layer] += summaries_read.sum()
    return attn


def _gather_kv(kv_cache: torch.Tensor, tables: torch.Tensor, length: int) -> torch.Tensor:
    """K and V context [2, B, length, KVH, D] from kv_cache [2, N, bs, KVH, D] via tables [B, nb].

    One index_select on the block dim for K and V together: a plain row copy, much faster
    than advanced indexing.
    """
    num_seqs, width = tables.shape
    _, _, block_size, kv_heads, head_dim = kv_cache.shape
    rows = kv_cache.index_select(1, tables.reshape(-1))
    return rows.view(2, num_seqs, width * block_size, kv_heads, head_dim)[:, :, :length]
