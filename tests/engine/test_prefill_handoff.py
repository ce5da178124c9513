"""PD handoff inside the engine: the PE side (add_prefill) prefills and samples the first
token with the request's params, then hands off the prompt KV + first token + generator
state; the DE side (add_request(kv=...)) continues. Output must equal a single engine run:
greedy, seeded, penalties, min_tokens and stop strings alike."""

from __future__ import annotations

import pytest

from engine.errors import InvalidRequestError
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from tests.helpers import chat

LONG_SYSTEM = (
    "You are a meticulous assistant for a team of systems engineers. Answer briefly and "
    "precisely, prefer concrete numbers, name the units you use, and say when you are not "
    "sure. Never invent citations. Keep answers under three sentences unless asked. "
    "When a question is ambiguous, state the interpretation you chose before answering, "
    "and when code is requested, give a minimal runnable example with its expected output."
)


@pytest.fixture
def engine(tiny_engine):
    """A fresh engine on the toy model: its prefix cache holds only this test's blocks."""
    return tiny_engine


def run_pd(engine, prompt, params, rid):
    """PE: add_prefill (first token + KV); DE: add_request(kv=...) for the rest."""
    engine.add_prefill(EngineRequest(f"{rid}-p", prompt, params))
    outputs = []
    while engine.has_unfinished():
        outputs.extend(engine.step())
    (first,) = [o for o in outputs if o.request_id == f"{rid}-p"]
    assert len(first.new_token_ids) == 1
    if first.finished:
        return first.new_token_ids, first, first, first.text
    kv = first.kv
    assert kv is not None and kv.num_tokens == len(prompt)
    assert kv.output_token_ids == first.new_token_ids
    engine.add_request(EngineRequest(rid, prompt, params, kv=kv))
    tokens, text = list(first.new_token_ids), first.new_text
    while engine.has_unfinished():
        for out in engine.step():
            tokens.extend(out.new_token_ids)
            text += out.new_text
            if out.finished:
                final = out
    return tokens, final, first, text


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
    tokens, final, first, text = run_pd(engine, prompt, params, "pd")
    assert tokens == alone.new_token_ids
    assert text == alone.text
    assert final.num_output_tokens == alone.num_output_tokens
    assert final.finish_reason == alone.finish_reason
    # the prefill reused every full prompt block the single run left in the prefix cache
    # (all but the last token's: its logits are needed)
    bs = engine.config.block_size
    assert first.num_cached_tokens == (len(prompt) - 1) // bs * bs


def test_prefill_request_frees_its_blocks_and_can_be_aborted(engine):
    prompt = chat(engine, "Tell me about the ocean.")
    total = engine.block_manager.num_blocks
    params = SamplingParams(temperature=0, max_tokens=50)
    engine.add_prefill(EngineRequest("p-abort", prompt, params))
    assert engine.abort("p-abort")
    assert not engine.has_unfinished()
    engine.add_prefill(EngineRequest("p-done", prompt, params))
    outputs = []
    while engine.has_unfinished():
        outputs += engine.step()
    assert len(outputs) == 1 and outputs[0].kv is not None and not outputs[0].finished
    assert engine.block_manager.num_free_blocks == total


def test_kv_that_leaves_nothing_to_compute_is_rejected(engine):
    prompt = chat(engine, "Hello there.")
    engine.add_prefill(EngineRequest("p", prompt, SamplingParams(temperature=0, max_tokens=5)))
    (out,) = engine.step()
    kv = out.kv
    kv.output_token_ids = []  # the prompt's KV alone: the DE would have nothing to sample from
    with pytest.raises(InvalidRequestError, match="leave a token"):
        engine.add_request(
            EngineRequest("d", prompt, SamplingParams(temperature=0, max_tokens=5), kv=kv)
        )
    assert not engine.has_unfinished()


def test_each_side_rejects_the_other_sides_fields(engine):
    """`kv`/`persist_from_block` are the DE's and `num_de_blocks` the PE's: a request that
    mixes them up is refused before it is queued, instead of being silently ignored."""
    prompt = chat(engine, "Hello there.")
    with pytest.raises(ValueError, match="num_de_blocks"):
        engine.add_request(EngineRequest("d", prompt, num_de_blocks=1))
    with pytest.raises(ValueError, match="persist_from_block"):
        engine.add_prefill(EngineRequest("p", prompt, persist_from_block=0))
    assert not engine.has_unfinished()


def test_can_import_reflects_free_blocks(engine):
    bm = engine.block_manager
    assert engine.can_import(bm.block_size)
    assert not engine.can_import((bm.num_free_blocks + 1) * bm.block_size)
