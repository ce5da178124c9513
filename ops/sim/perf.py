"""PerfModel: how long an engine's prefill step and decode step take, per model and device.

    prefill step  = linear FLOPs / (peak · linear_eff) + attention FLOPs / (peak · attn_eff)
                    + step overhead; linear = 2 · params_active per new token, attention =
                    per causal query-key pair (DSA: at most top-k keys per query, plus the
                    indexer over every key).
    decode step   = bytes (resident weights + the batch's KV reads) / (bandwidth · mem_eff)
                    combined with the batch's FLOPs (max on a GPU, sum on a CPU thread that
                    does one after the other) + per-sequence and per-step overheads.

The efficiencies are fitted to this machine's engine benchmark for the CPU device
(calibration.py) and assumed for GPUs (presets.py). Pure arithmetic, no state.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ops.sim.config import DeviceConfig, ModelConfig


def causal_pairs(num_cached: int, num_new: int, topk: int = 0) -> float:
    """Query-key pairs of a causal chunk: query i (1-based) sees cached + i keys, at most
    `topk` of them when topk > 0."""
    c, n = num_cached, num_new
    if n <= 0:
        return 0.0
    dense = n * c + n * (n + 1) / 2
    if topk <= 0 or c + n <= topk:
        return dense
    if c >= topk:
        return float(n * topk)
    m = topk - c  # queries that still see fewer than topk keys
    return m * c + m * (m + 1) / 2 + (n - m) * topk


@dataclass(frozen=True, slots=True)
class PerfModel:
    model: ModelConfig
    device: DeviceConfig
    weight_bytes: float  # resident on one engine and read by every decode step

    @property
    def peak_flops(self) -> float:
        return self.device.peak_flops[self.model.compute_dtype]

    # ------------------------------------------------------------------ prefill
    def prefill_flops(self, num_cached: int, num_new: int) -> tuple[float, float]:
        """(linear, attention) FLOPs of computing `num_new` tokens after `num_cached`."""
        m = self.model
        linear = 2.0 * m.params_active * num_new
        attn = m.attn_flops_per_pair * causal_pairs(num_cached, num_new, m.sparse_topk)
        if m.indexer_flops_per_pair:
            attn += m.indexer_flops_per_pair * causal_pairs(num_cached, num_new)
        return linear, attn

    def prefill_s(self, chunks: Iterable[tuple[int, int]]) -> float:
        """One prefill step over `(num_cached, num_new)` chunks, one per request."""
        linear = attn = gather = 0.0
        for cached, new in chunks:
            lin, att = self.prefill_flops(cached, new)
            linear += lin
            attn += att
            gather += cached + new
        d = self.device
        t = (
            linear / (self.peak_flops * d.prefill_linear_eff)
            + attn / (self.peak_flops * d.prefill_attn_eff)
            + d.prefill_step_overhead_s
        )
        if d.prefill_gathers_kv and d.copy_bytes_per_s:
            t += gather * self.model.kv_bytes_per_token / d.copy_bytes_per_s
        return t

    def cost_prior(self) -> tuple[float, float]:
        """(s per token, s per query-key pair): a profiled prior for the PE's
        engine.cost_model.PrefillCostModel (the paper's PEs fit FLOPs to time)."""
        d, m = self.device, self.model
        return (
            2 * m.params_active / (self.peak_flops * d.prefill_linear_eff),
            (m.attn_flops_per_pair + m.indexer_flops_per_pair)
            / (self.peak_flops * d.prefill_attn_eff),
        )

    # ------------------------------------------------------------------ decode
    def decode_kv_read_bytes(self, context: float) -> float:
        """KV bytes one decode token of a sequence with `context` tokens reads."""
        m = self.model
        keys = min(context, m.sparse_topk) if m.sparse_topk else context
        return keys * m.kv_bytes_per_token + context * m.indexer_bytes_per_token

    def decode_token_flops(self, context: float) -> float:
        m = self.model
        keys = min(context, m.sparse_topk) if m.sparse_topk else context
        return (
            2.0 * m.params_active
            + keys * m.attn_flops_per_pair
            + context * m.indexer_flops_per_pair
        )

    def decode_step_s(self, contexts: Iterable[float]) -> float:
        """One decode step of a batch whose sequences hold `contexts` tokens each."""
        topk = self.model.sparse_topk
        num, total, keys = 0, 0.0, 0.0
        for c in contexts:
            num += 1
            total += c
            keys += min(c, topk) if topk else c
        return self.decode_step_agg_s(num, total, keys)

    def decode_step_agg_s(self, num_seqs: int, sum_context: float, sum_keys: float) -> float:
        """decode_step_s from the batch's sums: contexts and keys attended (min(c, top-k))."""
        d, m = self.device, self.model
        kv_bytes = sum_keys * m.kv_bytes_per_token + sum_context * m.indexer_bytes_per_token
        flops = (
            2.0 * m.params_active * num_seqs
            + sum_keys * m.attn_flops_per_pair
            + sum_context * m.indexer_flops_per_pair
        )
        mem_s = (self.weight_bytes + kv_bytes) / (d.mem_bytes_per_s * d.decode_mem_eff)
        compute_s = flops / (self.peak_flops * d.prefill_linear_eff)
        core = mem_s + compute_s if d.decode_combine == "sum" else max(mem_s, compute_s)
        return core + num_seqs * d.decode_per_seq_s + d.decode_step_overhead_s

    # ------------------------------------------------------------------ capacity
    def kv_tokens_capacity(self, reserve_fraction: float = 0.1) -> int:
        """Tokens of KV that fit next to the weights (device memory less a reserve)."""
        m = self.model
        free = self.device.mem_bytes * (1 - reserve_fraction) - self.weight_bytes
        per_token = m.kv_bytes_per_token + m.indexer_bytes_per_token
        return max(0, int(free // per_token))


def engine_weight_bytes(model: ModelConfig, ep_size: int) -> float:
    """Weights resident on one engine when routed experts are sharded over `ep_size` GPUs."""
    shared = model.params_total - model.routed_expert_params
    per_engine = shared + model.routed_expert_params / max(1, ep_size)
    return per_engine * model.weight_bytes_per_param
