"""Speculative decoding in the engine: drafts verified in the continuous batch give the output
of a run without speculation, token for token (greedy and seeded), through the PD handoff,
prefix hits, preemption and a replica move; stop strings, max/min_tokens, logprobs,
streaming and grammars keep working; no stored block holds a rejected token.

Most tests use `OracleDrafter`, which proposes the reference run's own continuation with
every `wrong_every`-th token corrupted: drafts are then accepted for several tokens and
rejected at known places, which the real drafters on a random toy model rarely manage.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from engine.config import EngineConfig, SpeculativeConfig
from engine.core import EngineCore
from engine.output import SequenceKV
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from engine.structured import json_grammar
from tests.helpers import chat

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=24, ignore_eos=True)
PENALTIES = SamplingParams(
    temperature=0.8, top_k=20, seed=3, max_tokens=20, min_tokens=6, frequency_penalty=0.4
)


class OracleDrafter:
    """Drafts the reference output's next tokens for a prompt it knows, every
    `wrong_every`-th one corrupted (so a draft is accepted up to a known place)."""

    def __init__(self, refs: dict[tuple[int, ...], list[int]], vocab: int, wrong_every: int = 4):
        self.refs = refs
        self.vocab = vocab
        self.wrong_every = wrong_every
        self.finished: list[str] = []

    def propose(self, request_id, tenant, token_ids, num_prompt_tokens, max_tokens):
        ref = self.refs.get(tuple(token_ids[:num_prompt_tokens]), [])
        done = len(token_ids) - num_prompt_tokens
        draft = list(ref[done : done + max_tokens])
        for i in range(len(draft)):
            if (done + i) % self.wrong_every == self.wrong_every - 1:
                draft[i] = (draft[i] + 1) % self.vocab
        return draft

    def finish(self, request_id, tenant, output_token_ids):
        self.finished.append(request_id)


def make_engine(model_dir, method="ngram", num_kv_blocks=256, **spec) -> EngineCore:
    spec_config = SpeculativeConfig(method=method, adaptive=False, **spec)
    return EngineCore(
        EngineConfig(
            model=model_dir,
            num_threads=1,
            block_size=16,
            num_kv_blocks=num_kv_blocks,
            speculative=spec_config,
        )
    )


def prompts_for(engine: EngineCore) -> list[list[int]]:
    """Chat prompts with heavy repetition (a block of text twice) and none."""
    rng = random.Random(5)
    words = ["alpha", "beta", "gamma", "delta", "kappa", "omega", "sigma", "theta"]
    text = " ".join(rng.choice(words) for _ in range(40))
    return [
        chat(engine, f"Repeat this exactly: {text}\n{text}\n{text[:60]}"),
        chat(engine, "Name three colours."),
        list(range(5, 25)) * 4,  # raw ids, one pattern four times
    ]


def run(engine: EngineCore, prompts, params) -> tuple[list[list[int]], list[str]]:
    outs = engine.generate(prompts, params)
    return [o.new_token_ids for o in outs], [o.text for o in outs]


def with_oracle(engine: EngineCore, prompts, ref_tokens, wrong_every=4) -> OracleDrafter:
    oracle = OracleDrafter(
        {tuple(p): r for p, r in zip(prompts, ref_tokens, strict=True)},
        engine.model_config.vocab_size,
        wrong_every,
    )
    engine.speculator.drafter = oracle
    return oracle


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """Outputs of an engine without speculation (fresh engine: no shared prefix cache)."""
    engine = EngineCore(EngineConfig(model=tiny_model_dir, num_threads=1, block_size=16))
    prompts = prompts_for(engine)
    return prompts, {
        name: run(engine, prompts, params)
        for name, params in [("greedy", GREEDY), ("seeded", SEEDED), ("penalties", PENALTIES)]
    }


@pytest.mark.parametrize("method", ["ngram", "suffix"])
@pytest.mark.parametrize("name", ["greedy", "seeded", "penalties"])
def test_real_drafters_keep_the_output(tiny_model_dir, reference, method, name):
    prompts, refs = reference
    params = {"greedy": GREEDY, "seeded": SEEDED, "penalties": PENALTIES}[name]
    spec = {"prompt_lookup_min": 1} if method == "ngram" else {}
    engine = make_engine(tiny_model_dir, method, **spec)
    assert run(engine, prompts, params) == refs[name]
    assert engine.spec_stats.drafted_tokens > 0  # it did speculate


@pytest.mark.parametrize("name", ["greedy", "seeded", "penalties"])
@pytest.mark.parametrize("wrong_every", [2, 5, 1000])
def test_accepted_runs_and_rejections_keep_the_output(tiny_model_dir, reference, name, wrong_every):
    prompts, refs = reference
    params = {"greedy": GREEDY, "seeded": SEEDED, "penalties": PENALTIES}[name]
    engine = make_engine(tiny_model_dir)
    with_oracle(engine, prompts, refs[name][0], wrong_every)
    assert run(engine, prompts, params) == refs[name]
    stats = engine.spec_stats
    assert stats.accepted_tokens > 0
    if wrong_every < 1000:
        assert stats.accepted_tokens < stats.drafted_tokens  # some were rejected
    assert stats.mean_accepted_length > 1.5
    assert not engine.block_manager.key_to_block or engine.block_manager.num_free_blocks > 0


def test_outputs_stream_stop_and_count_as_without_speculation(tiny_model_dir):
    """Stop strings, max_tokens, min_tokens, logprobs and streamed deltas: several tokens
    per step arrive as one delta whose text is the same as one token at a time."""
    plain = EngineCore(EngineConfig(model=tiny_model_dir, num_threads=1, block_size=16))
    prompts = prompts_for(plain)
    base = dict(temperature=0, max_tokens=30, logprobs=2, ignore_eos=True)
    ref = plain.generate(prompts, SamplingParams(**base))
    # stop on a piece of the reference text, so the stop string is hit mid-draft
    stop = ref[0].text[10:14]
    cases = [SamplingParams(**base), SamplingParams(**base, stop=[stop]), SamplingParams(**{
        **base, "max_tokens": 7, "min_tokens": 5})]  # fmt: skip
    for params in cases:
        want = plain.generate(prompts, params)
        engine = make_engine(tiny_model_dir)
        with_oracle(engine, prompts, [o.new_token_ids for o in ref], wrong_every=6)
        streamed: dict[str, tuple[list[int], str, int]] = {}
        got = {}
        ids = [f"s{i}" for i in range(len(prompts))]
        for rid, prompt in zip(ids, prompts, strict=True):
            engine.add_request(EngineRequest(rid, prompt, params))
        while engine.has_unfinished():
            for out in engine.step():
                toks, text, n_lp = streamed.get(out.request_id, ([], "", 0))
                streamed[out.request_id] = (
                    toks + out.new_token_ids,
                    text + out.new_text,
                    n_lp + len(out.new_logprobs),
                )
                if out.finished:
                    got[out.request_id] = out
        for rid, w in zip(ids, want, strict=True):
            toks, text, n_lp = streamed[rid]
            assert toks == w.new_token_ids
            assert text == w.text == got[rid].text
            assert got[rid].finish_reason == w.finish_reason
            assert n_lp == len(toks)  # one logprob per emitted token
            assert len(toks) <= params.max_tokens
        assert engine.spec_stats.accepted_tokens > 0


def test_pd_handoff_prefix_hit_and_replica_move(tiny_model_dir, reference):
    """The DE speculates after the PE's handoff; a second request hits the prefix cache;
    a request moved to another engine mid-reply (no KV: recomputed) continues alike."""
    prompts, refs = reference
    for name, params in [("greedy", GREEDY), ("seeded", SEEDED)]:
        ref_tokens = refs[name][0]
        engine = make_engine(tiny_model_dir)
        with_oracle(engine, prompts, ref_tokens)
        for i, prompt in enumerate(prompts):
            engine.add_prefill(EngineRequest(f"p{i}", prompt, params))
            first = [o for o in _drain(engine) if o.request_id == f"p{i}"][0]
            engine.add_request(EngineRequest(f"d{i}", prompt, params, kv=first.kv))
            tokens = first.new_token_ids + _tokens(_drain(engine), f"d{i}")
            assert tokens == ref_tokens[i]
        hit = engine.generate([prompts[0]], params)[0]  # prefix cache: same blocks
        assert hit.num_cached_tokens > 0 and hit.new_token_ids == ref_tokens[0]
        moved = make_engine(tiny_model_dir)
        with_oracle(moved, prompts, ref_tokens)
        cut = 9
        kv = SequenceKV(list(prompts[0]), [], None, output_token_ids=ref_tokens[0][:cut])
        moved.add_request(EngineRequest("m", prompts[0], params, kv=kv))
        assert ref_tokens[0][:cut] + _tokens(_drain(moved), "m") == ref_tokens[0]
        assert moved.spec_stats.accepted_tokens > 0


def test_preemption_keeps_the_output(tiny_model_dir, reference):
    """A pool too small for every reply at once: sequences are preempted and recomputed,
    drafts never preempt anyone, and the output is the unconstrained run's."""
    prompts, refs = reference
    need = [-(-(len(p) + GREEDY.max_tokens) // 16) for p in prompts]
    blocks = max(need) + 2  # the longest fits alone, not all together
    assert blocks < sum(need)
    engine = make_engine(tiny_model_dir, num_kv_blocks=blocks)
    with_oracle(engine, prompts, refs["greedy"][0], wrong_every=3)
    assert run(engine, prompts, GREEDY) == refs["greedy"]
    assert engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == blocks


def test_no_stored_block_holds_a_rejected_token(tiny_model_dir, reference):
    """Blocks handed to the KV store (and keyed in the prefix cache) are those a run
    without speculation stores, with the same KV: rejected drafts' KV never gets a key."""
    prompts, refs = reference
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)

    def persisted(engine: EngineCore) -> dict[bytes, torch.Tensor]:
        stored: dict[bytes, torch.Tensor] = {}
        for i, prompt in enumerate(prompts):
            engine.add_request(EngineRequest(f"r{i}", prompt, params, persist_from_block=0))
            while engine.has_unfinished():
                engine.step()
                stored.update(engine.drain_persist())
        return stored

    plain = EngineCore(EngineConfig(model=tiny_model_dir, num_threads=1, block_size=16))
    want = persisted(plain)
    ref_tokens = [o.new_token_ids for o in plain.generate(prompts, params)]
    engine = make_engine(tiny_model_dir)
    with_oracle(engine, prompts, ref_tokens, wrong_every=2)  # half of all drafts rejected
    got = persisted(engine)
    assert engine.spec_stats.accepted_tokens < engine.spec_stats.drafted_tokens
    assert got.keys() == want.keys()
    for key, block in got.items():
        torch.testing.assert_close(block, want[key], atol=1e-4, rtol=1e-4)
    for block_id, key in enumerate(engine.block_manager.block_keys):
        if key is not None and key in want:
            cached = engine.kv_port.kv_cache.export_blocks([block_id])[0]
            torch.testing.assert_close(cached, want[key], atol=1e-4, rtol=1e-4)


def test_grammar_rejects_draft_tokens_it_forbids(tiny_model_dir):
    """Drafts of free text against a JSON grammar: every forbidden draft token is rejected,
    the output is the run without speculation's and validates."""
    grammar = json_grammar(
        {
            "type": "object",
            "properties": {"colour": {"enum": ["red", "blue"]}, "n": {"type": "integer"}},
            "required": ["colour", "n"],
            "additionalProperties": False,
        }
    )
    plain = EngineCore(EngineConfig(model=tiny_model_dir, num_threads=1, block_size=16))
    prompts = [chat(plain, "Give me JSON."), chat(plain, "Another one, please.")]
    completed = 0
    for seed in (1, 2, 3):
        params = SamplingParams(temperature=0.8, seed=seed, max_tokens=80, grammar=grammar)
        want = [o.new_token_ids for o in plain.generate(prompts, params)]
        engine = make_engine(tiny_model_dir)
        free_text = [list(range(300, 340))] * len(prompts)  # never valid JSON
        with_oracle(engine, prompts, free_text, wrong_every=1000)
        got = engine.generate(prompts, params)
        assert [o.new_token_ids for o in got] == want
        for out in got:
            if out.finish_reason == "stop":  # (a long integer may run into max_tokens)
                assert set(json.loads(out.text)) == {"colour", "n"}
                completed += 1
        assert engine.spec_stats.drafted_tokens > 0
        assert engine.spec_stats.accepted_tokens < engine.spec_stats.drafted_tokens
    assert completed


def test_a_request_can_opt_out_and_prefill_engines_never_draft(tiny_model_dir, reference):
    prompts, refs = reference
    engine = make_engine(tiny_model_dir)
    oracle = with_oracle(engine, prompts, refs["greedy"][0])
    opt_out = GREEDY.model_copy(update={"speculative": False})
    outs = engine.generate(prompts, opt_out)
    assert [o.new_token_ids for o in outs] == refs["greedy"][0]
    assert engine.spec_stats.drafted_tokens == 0
    assert all(o.num_drafted_tokens == 0 for o in outs)
    engine.add_prefill(EngineRequest("pe", prompts[0], GREEDY))
    _drain(engine)
    assert engine.spec_stats.drafted_tokens == 0 and "pe" not in oracle.finished
    out = engine.generate([prompts[0]], GREEDY)[0]
    assert out.num_drafted_tokens > 0 and out.num_accepted_tokens > 0


def test_speculation_is_refused_with_sparse_attention(tiny_model_dir):
    with pytest.raises(ValueError, match="sparse"):
        EngineConfig(
            model=tiny_model_dir, attention="sparse", speculative=SpeculativeConfig(method="ngram")
        )


def _drain(engine: EngineCore):
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    return outs


def _tokens(outs, rid: str) -> list[int]:
    return [t for o in outs if o.request_id == rid for t in o.new_token_ids]


def test_bf16_drafted_rows_round_like_plain_decode_rows(tiny_model_dir):
    """bf16 KV on CPU: verifying one sequence's draft gives each position the very logits
    (bit for bit) a plain decode step gives it, on both sides of the SDPA / bmm threshold
    (512 context tokens); SDPA alone rounds by key length and query count."""
    base = dict(model=tiny_model_dir, num_threads=1, block_size=16, dtype="bfloat16")
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    prompt = [7 + i % 300 for i in range(470)]  # decodes from 471 to 534 context tokens

    def logits_by_position(engine: EngineCore) -> dict[int, torch.Tensor]:
        seen: dict[int, torch.Tensor] = {}
        real = engine.runner.sampler

        def spy(logits, seqs):
            for row, seq in zip(logits, seqs, strict=True):
                seen[seq.num_output_tokens] = row.clone()
            return real(logits, seqs)

        engine.runner.sampler = spy
        engine.generate([prompt], params)
        return seen

    plain = EngineCore(EngineConfig(**base))
    want = logits_by_position(plain)
    ref = plain.generate([prompt], params)[0].new_token_ids
    engine = EngineCore(
        EngineConfig(**base, speculative=SpeculativeConfig(method="ngram", adaptive=False))
    )
    with_oracle(engine, [prompt], [ref], wrong_every=5)
    got = logits_by_position(engine)
    assert engine.spec_stats.accepted_tokens > 10
    assert got.keys() == want.keys()
    differ = [pos for pos in want if not torch.equal(got[pos], want[pos])]
    assert not differ, f"positions whose logits differ: {differ}"
