"""ModelRunner: build tensors from a StepPlan, run the model, sample. No policy here."""

from __future__ import annotations

import logging

import torch
from torch import nn

from engine.batch_scheduler import StepPlan
from engine.config import EngineConfig, ModelConfig
from engine.forward_context import AttentionMetadata, ForwardContext, PrefillSpan, SparseContext
from engine.gguf_weights import gguf_source
from engine.kernels.sparse_attention import SparseSpec, SparseStats
from engine.kv_cache import KVCache
from engine.kv_import import LayerwiseImport
from engine.layers.linear import Linear, onednn_available
from engine.loader import load_weights, quantize_linears
from engine.models.registry import resolve_model_class
from engine.sampler import Sampler
from engine.sequence import Sequence

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model_config: ModelConfig,
        num_blocks: int,
        eos_token_ids: list[int] | None = None,
    ):
        self.config = config
        self.model_config = model_config
        self.device = torch.device(config.device)
        self.block_size = config.block_size
        max_len = config.resolve_max_model_len(model_config)
        model_cls = resolve_model_class(model_config.architectures)
        with torch.device(self.device):
            self.model = model_cls(model_config, max_positions=max_len)
        load_weights(self.model, config.model, model_config.tie_word_embeddings)
        self.quant_sources: dict[str, int] = {}
        if config.quantization != "none":
            gguf = gguf_source(config.model) if config.quantization == "int4" else None
            self.quant_sources = quantize_linears(
                self.model,
                config.quantization,
                config.quant_max_rows,
                config.torch_dtype,
                config.int4_group_size,
                gguf,
                head=config.quant_head,
            )
            logger.info(
                "quantised linears",
                extra={"quantization": config.quantization, **self.quant_sources},
            )
        # NOTE: only parameters change dtype; rotary cos/sin buffers stay float32.
        for param in self.model.parameters():
            param.data = param.data.to(config.torch_dtype)
        if config.torch_dtype != torch.float32 and hasattr(self.model, "use_mixed_precision"):
            self.model.use_mixed_precision(config.torch_dtype)
        self.model.eval()
        # Bytes every decode step must read (the roofline's numerator): tied tensors once,
        # a quantised linear's packed weight rather than its dense copy.
        self.weight_bytes = decode_weight_bytes(self.model)
        if self.device.type == "cpu" and config.cpu_linear_backend != "torch":
            if onednn_available():
                self.model.prepack_linears()
            elif config.cpu_linear_backend == "onednn":
                raise RuntimeError("cpu_linear_backend='onednn' but this torch has no oneDNN")
        self.sparse_spec = build_sparse_spec(config, model_config)
        self.kv_cache = KVCache(
            model_config,
            num_blocks,
            config.block_size,
            config.kv_torch_dtype,
            self.device,
            sparse=self.sparse_spec,
        )
        self.kv_layers = self.kv_cache.layer_views()
        self.kv_summaries = self.kv_cache.summary_views()
        # decode tokens read by sparse attention so far (None when dense)
        self.sparse_stats = (
            SparseStats.zeros(model_config.num_hidden_layers, self.device)
            if self.sparse_spec is not None
            else None
        )
        self.sampler = Sampler(config.seed, eos_token_ids)
        self.last_import: LayerwiseImport | None = None

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> tuple[list[Sequence], torch.Tensor | None]:
        """Execute one step; return the sequences that sample and their logits [R, V]
        (float32): one row each, plus one per drafted token (verified by the caller)."""
        input_ids, ctx, sample_idx, sample_seqs = self._prepare(plan)
        pending = [pair for chunk in plan.chunks for pair in chunk.seq.pending_import]
        self.last_import = None
        if pending:
            # NOTE: the import writes only blocks this step's chunks attend to, never blocks
            # the forward writes (fresh tokens go after the imported prefix).
            self.last_import = LayerwiseImport(self.kv_cache, pending).start()
            ctx.before_layer = self.last_import.wait
            for chunk in plan.chunks:
                chunk.seq.pending_import = []
        try:
            hidden = self.model(input_ids, ctx)
        finally:
            if self.last_import is not None:
                self.last_import.join()
        if self.last_import is not None and self.sparse_spec is not None:
            # NOTE: the layer-wise import copies KV behind attention's back: summarise it.
            self.kv_cache.refresh_summaries([block_id for block_id, _ in pending])
        if not sample_seqs:
            return [], None
        return sample_seqs, self.model.compute_logits(hidden[sample_idx]).float().cpu()

    def _prepare(
        self, plan: StepPlan
    ) -> tuple[torch.Tensor, ForwardContext, torch.Tensor, list[Sequence]]:
        """Flatten the plan's chunks into one token batch plus attention metadata."""
        bs = self.block_size
        dev = self.device
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_idx: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillSpan] = []
        sample_idx: list[int] = []
        sample_seqs: list[Sequence] = []
        # NOTE: a decode chunk with a draft is one decode "row group": its 1 + d queries
        # share the sequence's block table and see the context up to themselves (a
        # multi-query decode), so verification runs in the batched decode attention.
        decode_groups: list[list[int]] = []  # per decode chunk: its query lengths
        for chunk in plan.chunks:
            seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
            t = len(input_ids)
            end = start + n
            d = len(chunk.draft)
            table = seq.block_table[: -(-(end + d) // bs)]
            input_ids.extend(seq.token_ids[start:end])
            input_ids.extend(chunk.draft)
            positions.extend(range(start, end + d))
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end + d))
            if n == 1:
                decode_idx.extend(range(t, t + 1 + d))
                decode_tables.append(table)
                decode_groups.append(list(range(end, end + 1 + d)))
                decode_lens.extend(range(end, end + 1 + d))
            else:
                mask = None
                if start > 0:  # chunk after a cached prefix: causal, offset by `start`
                    q_pos = torch.arange(start, end, device=dev).unsqueeze(1)
                    mask = torch.arange(end, device=dev).unsqueeze(0) <= q_pos
                prefills.append(
                    PrefillSpan(t, n, end, torch.tensor(table, dtype=torch.long, device=dev), mask)
                )
            if chunk.samples:
                sample_idx.extend(range(t + n - 1, t + n + len(chunk.draft)))
                sample_seqs.append(seq)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            prefills=prefills,
        )
        if decode_idx:
            self._prepare_decode(meta, decode_idx, decode_tables, decode_groups)
            meta.decode_only = not prefills and meta.decode_real_rows is None
        ctx = ForwardContext(
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            rope=None,
            attn=meta,
            kv_caches=self.kv_layers,
        )
        if self.sparse_spec is not None:
            self._prepare_sparse(ctx, positions, slots, decode_lens)
        ids = torch.tensor(input_ids, dtype=torch.long, device=dev)
        return ids, ctx, torch.tensor(sample_idx, dtype=torch.long, device=dev), sample_seqs

    def _prepare_decode(
        self,
        meta: AttentionMetadata,
        decode_idx: list[int],
        tables: list[list[int]],
        groups: list[list[int]],
    ) -> None:
        """Batched decode metadata: one row group per sequence, `q_len` queries each (more
        than 1 when a draft is verified); shorter groups repeat their last query."""
        dev = self.device
        q_len = max(len(g) for g in groups)
        width = max(len(t) for t in tables)
        max_len = max(g[-1] for g in groups)
        idx: list[int] = []
        lens: list[int] = []
        real: list[int] = []
        at = 0
        for group in groups:
            pad = q_len - len(group)
            rows = decode_idx[at : at + len(group)]
            at += len(group)
            real.extend(range(len(idx), len(idx) + len(group)))
            idx.extend(rows + rows[-1:] * pad)
            lens.extend(group + group[-1:] * pad)
        meta.decode_token_idx = torch.tensor(idx, dtype=torch.long, device=dev)
        meta.decode_block_tables = torch.tensor(
            [t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=dev
        )
        meta.decode_context_len = max_len
        meta.decode_plain_context_len = max(g[0] for g in groups)
        meta.decode_query_len = q_len
        if len(real) != len(idx):
            meta.decode_real_rows = torch.tensor(real, dtype=torch.long, device=dev)
        if min(lens) != max_len:
            lens_t = torch.tensor(lens, device=dev).view(len(groups), q_len, 1)
            mask = torch.arange(max_len, device=dev).view(1, 1, -1) < lens_t
            meta.decode_mask = mask[:, None, :, :]  # [S, 1, q_len, L]

    def _prepare_sparse(
        self, ctx: ForwardContext, positions: list[int], slots: list[int], decode_lens: list[int]
    ) -> None:
        """Sparse attention's extra inputs: decode lengths and the score blocks that fill."""
        assert self.sparse_spec is not None and self.kv_summaries is not None
        sbs = self.sparse_spec.score_block_size
        filled = [s // sbs for p, s in zip(positions, slots, strict=True) if (p + 1) % sbs == 0]
        meta = ctx.attn
        meta.filled_sub_blocks = torch.tensor(filled, dtype=torch.long, device=self.device)
        if decode_lens:
            meta.decode_context_lens = torch.tensor(
                decode_lens, dtype=torch.long, device=self.device
            )
        ctx.sparse = SparseContext(self.sparse_spec, self.kv_summaries, self.sparse_stats)


def decode_weight_bytes(model: nn.Module) -> int:
    """Weight bytes one decode step reads: each tensor once (a tied head is the embedding
    table), and a quantised Linear's quantised weight rather than its dense copy."""
    quantised = [m for m in model.modules() if isinstance(m, Linear) and m.quant is not None]
    skip = {m.weight.data_ptr() for m in quantised}
    unique = {p.data_ptr(): p for p in model.parameters() if p.data_ptr() not in skip}
    dense = sum(p.numel() * p.element_size() for p in unique.values())
    return dense + sum(m.quant.nbytes for m in quantised if m.quant is not None)


def build_sparse_spec(config: EngineConfig, model_config: ModelConfig) -> SparseSpec | None:
    """The resolved sparse-attention knobs, or None when attention is dense."""
    if config.attention == "dense":
        return None
    sparse = config.sparse
    return SparseSpec(
        fractions=sparse.fractions(model_config.num_hidden_layers),
        num_sink_tokens=sparse.num_sink_tokens,
        window_tokens=sparse.window_tokens,
        score_block_size=config.score_block_size,
        summary=sparse.summary,
        global_view=sparse.global_view,
        channels=sparse.channels,
    )
