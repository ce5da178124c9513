"""PD handoff inside the engine: a prefill-only request exports its KV; a second request
imports it for a prompt prefix, computes the last prompt token itself and samples. Output
must equal a single engine run: greedy, seeded, penalties and min_tokens alike."""

from __future__ import annotations

import pytest

from engine.sampling_params import SamplingParams
from tests.helpers import chat

LONG_SYSTEM = (
    "You are a meticulous assistant for a team of systems engineers. Answer briefly and "
    "precisely, prefer concrete numbers, name the units you use, and say when you are not "
    "sure. Never invent citations. Keep answers under three sentences unless asked. "
    "When a question is ambiguous, state the interpretation you chose before answering, "
    "and when code is requested, give a minimal runnable example with its expected output."
)


def run_pd(engine, prompt, params, rid):
    """Prefill prompt[:-1] as its own request, then decode with the exported KV."""
    engine.add_prefill(f"{rid}-p", prompt[:-1])
    outputs = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    (pre,) = [o for o in outputs if o.request_id == f"{rid}-p"]
    assert pre.finished and pre.kv is not None and pre.new_token_ids == []
    assert pre.kv.num_tokens == len(prompt) - 1
    engine.add_request(rid, prompt, params, kv=pre.kv)
    tokens = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens.extend(out.new_token_ids)
            if out.finished:
                final = out
    return tokens, final, pre


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=24),
        SamplingParams(temperature=0.9, top_p=0.9, seed=1234, max_tokens=24),
        SamplingParams(temperature=0.8, seed=7, max_tokens=16, min_tokens=4, presence_penalty=0.5),
    ],
    ids=["greedy", "seeded", "penalties+min_tokens"],
)
def test_pd_handoff_output_equals_single_engine(engine, params):
    prompt = chat(engine, "Name three uses of a hash table.", system=LONG_SYSTEM)
    assert len(prompt) > engine.config.block_size  # full blocks travel with keys
    (alone,) = engine.generate([prompt], params)
    tokens, final, pre = run_pd(engine, prompt, params, "pd")
    assert tokens == alone.new_token_ids
    assert final.num_output_tokens == alone.num_output_tokens
    assert final.finish_reason == alone.finish_reason
    # the prefill reused the prompt blocks the single run left in the prefix cache
    assert pre.num_cached_tokens >= engine.config.block_size


def test_prefill_only_request_frees_its_blocks_and_can_be_aborted(engine):
    prompt = chat(engine, "Tell me about the ocean.")
    total = engine.block_manager.num_blocks
    engine.add_prefill("p-abort", prompt)
    assert engine.abort("p-abort")
    assert not engine.has_unfinished()
    engine.add_prefill("p-done", prompt)
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.num_free_blocks == total


def test_can_import_reflects_free_blocks(engine):
    bm = engine.block_manager
    assert engine.can_import(bm.block_size)
    assert not engine.can_import((bm.num_free_blocks + 1) * bm.block_size)
