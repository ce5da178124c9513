"""The performance model's arithmetic, and the model presets against the paper's Table 1."""

from __future__ import annotations

import pytest

from ops.sim.perf import PerfModel, causal_pairs, engine_weight_bytes
from ops.sim.presets import resolve_device, resolve_model


def test_causal_pairs_dense_and_topk() -> None:
    assert causal_pairs(0, 4) == 1 + 2 + 3 + 4
    assert causal_pairs(10, 2) == 11 + 12
    assert causal_pairs(0, 4, topk=2) == 1 + 2 + 2 + 2
    assert causal_pairs(5, 3, topk=2) == 6
    assert causal_pairs(1, 3, topk=3) == 2 + 3 + 3


def _gb_per_pflop(model: str, context: int, append: int = 429) -> float:
    m = resolve_model(model)
    perf = PerfModel(m, resolve_device("hopper"), engine_weight_bytes(m, 1))
    linear, attn = perf.prefill_flops(context, append)
    return context * m.kv_bytes_per_token / 1e9 / ((linear + attn) / 1e15)


@pytest.mark.parametrize(
    ("model", "context", "paper"),
    [
        ("ds-660b", 16_384, 13),
        ("ds-660b", 32_768, 22),
        ("ds-660b", 65_536, 36),
        ("qwen2.5-32b", 16_384, 117),
        ("qwen2.5-32b", 65_536, 267),
    ],
)
def test_cache_compute_ratio_matches_paper_table_1(model: str, context: int, paper: float):
    """GB of KV per PFLOP of a 429-token append (paper Table 1) within 10%: the FLOP and
    KV-size arithmetic of the presets is the paper's."""
    assert _gb_per_pflop(model, context) == pytest.approx(paper, rel=0.10)


def test_decode_step_grows_with_batch_and_context() -> None:
    m = resolve_model("qwen2.5-32b")
    perf = PerfModel(m, resolve_device("hopper"), engine_weight_bytes(m, 1))
    one, eight = perf.decode_step_s([30_000]), perf.decode_step_s([30_000] * 8)
    assert one < eight < 8 * one
    assert perf.decode_step_s([1_000] * 8) < eight


def test_expert_parallel_shards_only_routed_weights() -> None:
    m = resolve_model("ds-660b")
    shared = (m.params_total - m.routed_expert_params) * m.weight_bytes_per_param
    assert engine_weight_bytes(m, 32) == pytest.approx(shared + m.routed_expert_params / 32)
