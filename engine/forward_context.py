"""Per-step inputs to attention, built once by the runner and passed explicitly to layers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from engine.kernels.sparse_attention import SparseSpec, SparseStats


@dataclass(slots=True)
class PrefillSpan:
    """One sequence's chunk in the flat token batch, attending to `context_len` cached tokens."""

    query_start: int
    query_len: int
    context_len: int  # tokens of KV visible to the chunk's last query (prefix + chunk)
    block_table: torch.Tensor  # [num_blocks] long, covering context_len
    mask: torch.Tensor | None  # [query_len, context_len] bool, None when purely causal


@dataclass(slots=True)
class AttentionMetadata:
    """Where each new token's KV goes and what each query attends to.

    Decode queries (one token each, or a token and its draft) are batched: their block
    tables are padded to the same width and `decode_mask` hides the padding. Prefill
    chunks are handled one span each.
    """

    slot_mapping: torch.Tensor  # [num_tokens] long: flat slot of each new token's KV
    decode_token_idx: torch.Tensor | None = None  # [num_decodes] positions in the flat batch
    decode_block_tables: torch.Tensor | None = None  # [num_decodes, max_blocks] long
    decode_context_len: int = 0  # longest decode context; keys are cut to this length
    decode_mask: torch.Tensor | None = None  # [num_decodes, 1, query_len, context_len] bool
    decode_only: bool = False  # every token is a decode, in order (decode_token_idx = arange)
    # Speculative verification: a decode "row group" per sequence of `decode_query_len`
    # queries (its last token and its draft), shorter groups padded by repeating their last
    # query; `decode_real_rows` picks the unpadded rows (None when nothing is padded).
    decode_query_len: int = 1
    decode_real_rows: torch.Tensor | None = None
    decode_plain_context_len: int = 0  # the longest context without the drafts
    prefills: list[PrefillSpan] = field(default_factory=list)
    # Sparse attention only (None when dense):
    decode_context_lens: torch.Tensor | None = None  # [num_decodes] long, current token incl.
    filled_sub_blocks: torch.Tensor | None = None  # [m] flat score blocks this step fills


@dataclass(slots=True)
class SparseContext:
    """What sparse decode attention needs beyond the cache: its knobs, the per-layer key
    summaries kept beside the cache, and the counters of tokens read."""

    spec: SparseSpec
    summaries: list[torch.Tensor]  # per layer: [num_sub_blocks, S, kv_heads, head_dim]
    stats: SparseStats | None = None


@dataclass(slots=True)
class ForwardContext:
    positions: torch.Tensor  # [num_tokens] long
    rope: tuple[torch.Tensor, torch.Tensor] | None  # (cos, sin) per token, set by the model
    attn: AttentionMetadata
    kv_caches: list[torch.Tensor]  # per layer: [2, num_blocks, block_size, kv_heads, head_dim]
    before_layer: Callable[[int], None] | None = None  # waits for layer i's stored KV
    sparse: SparseContext | None = None  # set when the engine's attention is sparse
