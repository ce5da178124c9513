"""Grammar-constrained decoding in the engine: the packed bitmask against a reference, JSON
outputs that validate, unstructured neighbours untouched, and the grammar state carried
across the PD handoff."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from engine.structured import GrammarError, allowed_tokens, apply_bitmask, json_grammar
from tests.helpers import chat

SCHEMA = {
    "type": "object",
    "properties": {  # not in alphabetical order: outputs keep the declared order
        "ok": {"type": "boolean"},
        "colour": {"enum": ["red", "green", "blue"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["colour", "count", "ok"],
    "additionalProperties": False,
}
GRAMMAR = json_grammar(SCHEMA)


@pytest.fixture
def engine(tiny_engine):
    return tiny_engine


def test_bitmask_unpacks_like_a_reference():
    gen = torch.Generator().manual_seed(0)
    for vocab in (1, 31, 32, 33, 384, 1000):
        words = (vocab + 31) // 32
        mask = torch.randint(-(2**31), 2**31 - 1, (3, words), generator=gen, dtype=torch.int64)
        mask = mask.to(torch.int32)
        want = torch.tensor(
            [[(int(mask[r, t // 32]) >> (t % 32)) & 1 == 1 for t in range(vocab)] for r in range(3)]
        )
        assert torch.equal(allowed_tokens(mask, vocab), want)
        logits = torch.randn(3, vocab, generator=gen)
        expect = logits.masked_fill(~want, float("-inf"))
        apply_bitmask(logits, mask)
        assert torch.equal(logits, expect)


def _run(engine, prompts, params):
    return [o for o in engine.generate(prompts, params)]


@pytest.mark.parametrize("seed", range(6))
def test_json_schema_output_validates(engine, seed):
    params = SamplingParams(temperature=1.0, seed=seed, max_tokens=64, grammar=GRAMMAR)
    (out,) = _run(engine, [chat(engine, "Name a colour.")], params)
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.text), SCHEMA)
    assert list(json.loads(out.text)) == list(SCHEMA["properties"])  # in declared order


def test_plain_rows_are_untouched_by_structured_neighbours(engine):
    prompts = [chat(engine, q) for q in ("Count to five.", "Tell me about the ocean.")]
    plain = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    alone = [o.new_token_ids for o in _run(engine, prompts, plain)]
    structured = SamplingParams(temperature=0.7, seed=1, max_tokens=40, grammar=GRAMMAR)
    mixed = _run(engine, [prompts[0], prompts[0], prompts[1]], [plain, structured, plain])
    assert [mixed[0].new_token_ids, mixed[2].new_token_ids] == alone
    json.loads(mixed[1].text)


def test_grammar_state_survives_the_pd_handoff(engine):
    prompt = chat(engine, "Name a colour.")
    params = SamplingParams(temperature=0.9, seed=5, max_tokens=64, grammar=GRAMMAR)
    (single,) = _run(engine, [prompt], params)
    engine.add_prefill(EngineRequest("pe", prompt, params))
    (first,) = [o for o in engine.step() if o.request_id == "pe"]
    engine.add_request(EngineRequest("de", prompt, params, kv=first.kv))
    tokens = list(first.new_token_ids)
    while engine.has_unfinished():
        for out in engine.step():
            tokens.extend(out.new_token_ids)
    assert tokens == single.new_token_ids
    jsonschema.validate(json.loads(single.text), SCHEMA)


def test_a_resumed_sequence_rebuilds_the_state_from_its_tokens(engine):
    prompt = chat(engine, "Name a colour.")
    params = SamplingParams(temperature=0.9, seed=9, max_tokens=64, grammar=GRAMMAR)
    (single,) = _run(engine, [prompt], params)
    emitted = single.new_token_ids[:5]
    state = engine.grammars.state(GRAMMAR, emitted)
    assert not state.is_done
    with pytest.raises(GrammarError):
        engine.grammars.state(GRAMMAR, engine.tokenizer.encode("not json at all"))


def test_bad_grammars_are_refused_and_good_ones_cached(engine):
    with pytest.raises(GrammarError) as info:
        engine.grammars.compile('start: %json {"type": "string", "pattern": "(?<=x)a"}')
    assert info.value.code == "invalid_grammar"
    before = engine.grammars.hits
    engine.grammars.compile(GRAMMAR)
    engine.grammars.compile(GRAMMAR)
    assert engine.grammars.hits >= before + 1


def test_fast_forward_appends_forced_tokens_without_a_step_each(tiny_model_dir):
    """A tool-call grammar forces its name and keys: with fast-forward they arrive with the
    token sampled before them, so fewer steps produce a reply the grammar accepts."""
    from engine import EngineConfig, EngineCore

    grammar = json_grammar(
        {
            "type": "object",
            "properties": {
                "a_rather_long_key_name": {"enum": ["x", "y"]},
                "n": {"type": "integer", "maximum": 9},
            },
            "required": ["a_rather_long_key_name", "n"],
            "additionalProperties": False,
        }
    )
    steps, texts = {}, {}
    for ff in (True, False):
        config = EngineConfig(
            model=tiny_model_dir, num_threads=1, block_size=16, num_kv_blocks=64,
            grammar_fast_forward=ff,
        )  # fmt: skip
        engine = EngineCore(config)
        params = SamplingParams(temperature=0.8, seed=3, max_tokens=64, grammar=grammar)
        engine.add_request(EngineRequest("r", chat(engine, "Name a colour."), params))
        n, text = 0, ""
        while engine.has_unfinished():
            for out in engine.step():
                text += out.new_text
            n += 1
        steps[ff], texts[ff] = n, text
    for text in texts.values():
        assert set(json.loads(text)) == {"a_rather_long_key_name", "n"}
    assert steps[True] < steps[False]
