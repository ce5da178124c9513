"""The engine with `attention: sparse` on the real default model and real text."""

from __future__ import annotations

from pydoc_data.topics import topics

import pytest
import torch

from engine import EngineConfig, EngineCore, EngineRequest, SamplingParams
from engine.config import SparseAttentionConfig
from engine.kernels.sparse_attention import budget_tokens
from engine.kv_import import PrefixKV
from engine.layers import attention

pytestmark = pytest.mark.model

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def text_ids(engine) -> list[int]:
    return engine.tokenizer.encode(" ".join(v for _, v in sorted(topics.items())))


def _sparse_engine(model_dir, prefix_caching: bool = True, **sparse) -> EngineCore:
    return EngineCore(
        EngineConfig(
            model=model_dir,
            num_threads=2,
            block_size=16,
            kv_cache_bytes=64 << 20,
            enable_prefix_caching=prefix_caching,
            attention="sparse",
            sparse=SparseAttentionConfig(num_sink_tokens=16, window_tokens=16, **sparse),
        )
    )


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.9999, 1.0])
def test_full_budget_greedy_is_token_identical_to_dense(
    engine, model_dir, text_ids, fraction, monkeypatch
):
    """A budget that covers the context (0.9999 of these prompts rounds up to all of it)
    reads every block through the sparse path (summaries, selection, gather by block
    table); a budget of 1.0 sends the layer through the dense path. Neither may change a
    single greedy token, and both count every token as read."""
    start = int(torch.randint(0, 90_000, (1,), generator=torch.Generator().manual_seed(3)))
    prompts = [text_ids[start : start + 160], text_ids[start + 5000 : start + 5097]]
    dense = [o.new_token_ids for o in engine.generate(prompts, GREEDY)]
    sparse = _sparse_engine(model_dir, layer_fractions=(fraction,) * 30)
    calls = []
    real = attention._sparse_decode
    monkeypatch.setattr(attention, "_sparse_decode", lambda *a: calls.append(1) or real(*a))
    got = [o.new_token_ids for o in sparse.generate(prompts, GREEDY)]
    assert got == dense
    assert bool(calls) == (fraction < 1.0)  # which path the layers took
    stats = sparse.runner.sparse_stats
    assert stats is not None and torch.equal(stats.tokens_read, stats.tokens_context)


@pytest.mark.slow
def test_small_budget_reads_the_planned_tokens(model_dir, text_ids):
    """At a small per-layer budget decode still runs, and every layer read exactly the
    tokens its budget allows at each step (sinks + window + top-k blocks)."""
    sparse = _sparse_engine(model_dir, shallow_fraction=0.4, deep_fraction=0.1)
    prompt = text_ids[20_000:20_400]
    out = sparse.generate([prompt], GREEDY)[0]
    assert len(out.new_token_ids) == GREEDY.max_tokens
    spec = sparse.runner.sparse_spec
    stats = sparse.runner.sparse_stats
    assert spec is not None and stats is not None
    # decode steps see contexts len(prompt)+1 .. len(prompt)+max_tokens-1
    lens = range(len(prompt) + 1, len(prompt) + GREEDY.max_tokens)
    for layer, fraction in enumerate(spec.fractions):
        expected = sum(budget_tokens(n, fraction, spec) for n in lens)
        assert stats.tokens_read[layer].item() == expected
    assert stats.tokens_context[0].item() == sum(lens)
    assert 0.15 < stats.kv_fraction() < 0.35


@pytest.mark.slow
def test_sparse_decode_after_kv_import_matches_local(model_dir, text_ids):
    """An engine that imports the prompt's KV (PD handoff, or stored prefix blocks copied
    in layer by layer) summarises the imported blocks, so its sparse decode equals running
    the whole request on one sparse engine."""
    sparse = _sparse_engine(model_dir, shallow_fraction=0.35, deep_fraction=0.35)
    prompt = text_ids[40_000:40_250]  # 16 blocks: 42 forced tokens, 2 of 13 blocks by top-k
    local = sparse.generate([prompt], GREEDY)[0].new_token_ids
    sparse.add_prefill(EngineRequest("pe", prompt, GREEDY))
    kv = None
    while sparse.has_unfinished():
        for o in sparse.step():
            kv = o.kv or kv
    assert kv is not None
    de = _sparse_engine(model_dir, False, shallow_fraction=0.35, deep_fraction=0.35)
    de.add_request(EngineRequest("de", prompt, GREEDY, kv=kv))
    tokens = list(kv.output_token_ids)
    while de.has_unfinished():
        for o in de.step():
            tokens.extend(o.new_token_ids)
    assert tokens == local
    num_full = len(prompt) // 16
    de.runner.kv_cache.summaries.zero_()  # as fresh: nothing left from the import above
    prefix = PrefixKV(kv.block_keys[:num_full], list(kv.data[:num_full].unbind(0)))
    de.add_request(EngineRequest("prefix", prompt, GREEDY, prefix=prefix))
    tokens = []
    while de.has_unfinished():
        for o in de.step():
            tokens.extend(o.new_token_ids)
    assert de.import_totals.num_blocks == num_full
    assert tokens == local
