"""EngineCore end to end on the real default model (SmolLM2-135M-Instruct, float32, CPU)."""

from __future__ import annotations

import pytest

from engine import EngineCore, EngineRequest, InvalidRequestError, SamplingParams
from tests.helpers import GREEDY, chat

SYSTEM = (
    "You are a careful assistant for a team of site reliability engineers. Answer briefly, "
    "cite the command you would run, and never invent flags that do not exist. " * 7
)


def _run(
    engine: EngineCore, rid: str, ids: list[int], params: SamplingParams = GREEDY, salt: bytes = b""
):
    engine.add_request(EngineRequest(rid, ids, params, tenant_salt=salt))
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == rid]
    return outs


def test_real_model_answers_paris(engine):
    """This is a real model: greedy decoding knows the capital of France."""
    out = engine.generate([chat(engine, "What is the capital of France?")], GREEDY)[0]
    assert "Paris" in out.text
    assert out.finish_reason == "stop"


def test_prefix_cache_hit_gives_identical_output(engine):
    """A second turn sharing a long prefix is served from cached blocks, with the same reply."""
    ids = chat(engine, "Which command shows disk usage?", system=SYSTEM)
    assert len(ids) > 3 * engine.config.block_size
    first = engine.generate([ids], GREEDY)[0]
    second = engine.generate([ids], GREEDY)[0]
    assert second.num_cached_tokens >= 3 * engine.config.block_size
    assert second.num_cached_tokens % engine.config.block_size == 0
    assert second.new_token_ids == first.new_token_ids
    other = _run(engine, "salted", ids, salt=b"another-tenant")[-1]
    assert other.num_cached_tokens == 0  # no cross-tenant hits
    assert other.text == first.text


def test_batch_output_equals_single_sequence_output(engine):
    prompts = [
        chat(engine, q)
        for q in (
            "Name a colour.",
            "What is 12 times 12?",
            "Say hello in Spanish.",
            "What is the capital of Japan?",
            "Give me a word that rhymes with cat.",
        )
    ]
    single = [engine.generate([p], GREEDY)[0].new_token_ids for p in prompts]
    batched = [o.new_token_ids for o in engine.generate(prompts, GREEDY)]
    assert batched == single


def test_chunked_prefill_and_preemption_match_unconstrained_engine(engine, small_engine):
    """A 24-block pool with a 32-token step budget must chunk and preempt, yet produce the
    same greedy tokens as a roomy engine."""
    prompts = [
        chat(engine, q)
        for q in (
            "Describe a cat in one sentence.",
            "Describe a dog in one sentence.",
            "Describe a fish in one sentence.",
            "Describe a bird in one sentence.",
        )
    ]
    params = SamplingParams(temperature=0, max_tokens=80, ignore_eos=True)
    expected = [o.new_token_ids for o in engine.generate(prompts, params)]
    before = small_engine.scheduler.num_preemptions
    got = [o.new_token_ids for o in small_engine.generate(prompts, params)]
    assert small_engine.scheduler.num_preemptions > before
    assert got == expected
    assert small_engine.block_manager.num_free_blocks == small_engine.block_manager.num_blocks


def test_abort_frees_blocks(engine):
    bm = engine.block_manager
    free_before = bm.num_free_blocks
    engine.add_request(
        EngineRequest(
            "to-abort",
            chat(engine, "Tell me a long story.", system=SYSTEM),
            SamplingParams(max_tokens=200),
        )
    )
    engine.step()
    engine.step()
    assert bm.num_free_blocks < free_before
    assert engine.abort("to-abort")
    assert bm.num_free_blocks == free_before
    assert not engine.has_unfinished()
    assert engine.step() == []
    assert not engine.abort("to-abort")


def test_seeded_sampling_is_reproducible_in_any_batch(engine):
    ids = chat(engine, "Write a short poem about rain.")
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=7, max_tokens=24)
    alone = engine.generate([ids], params)[0].new_token_ids
    noise = [chat(engine, "Count to five."), chat(engine, "Name a fruit.")]
    mixed = engine.generate(
        [noise[0], ids, noise[1]], [SamplingParams(temperature=1.0), params, SamplingParams()]
    )
    assert mixed[1].new_token_ids == alone
    unseeded = engine.generate([ids], SamplingParams(temperature=1.0, seed=8, max_tokens=24))
    assert unseeded[0].new_token_ids != alone


def test_stop_string_is_cut_and_never_streamed(engine):
    ids = chat(engine, "What is the capital of France?")
    outs = _run(engine, "stop", ids, SamplingParams(temperature=0, max_tokens=30, stop=["Paris"]))
    final = outs[-1]
    assert final.finish_reason == "stop"
    assert "Paris" not in final.text and final.text.endswith("is ")
    assert "".join(o.new_text for o in outs) == final.text


def test_max_tokens_and_logprobs(engine):
    ids = chat(engine, "Tell me about the ocean.")
    outs = _run(engine, "len", ids, SamplingParams(temperature=0, max_tokens=5, logprobs=2))
    assert outs[-1].finish_reason == "length" and outs[-1].num_output_tokens == 5
    assert [len(o.new_logprobs[0].top) for o in outs] == [2] * 5


@pytest.mark.parametrize(
    ("prompt", "params", "match"),
    [
        ([], None, "empty"),
        ([1, 2, 10**6], None, "outside"),
        (list(range(9000)), None, "context"),
        ([1, 2, 3], SamplingParams(max_tokens=10**6), "exceeds the KV cache"),
    ],
)
def test_bad_requests_raise_clear_errors(engine, prompt, params, match):
    with pytest.raises(InvalidRequestError, match=match):
        engine.add_request(EngineRequest("bad", prompt, params))
    assert not engine.has_unfinished()


def test_duplicate_request_id_is_rejected(engine):
    engine.add_request(EngineRequest("dup", [1, 2, 3], SamplingParams(max_tokens=2)))
    with pytest.raises(InvalidRequestError, match="already running"):
        engine.add_request(EngineRequest("dup", [1, 2, 3]))
    engine.abort("dup")


def test_kv_export_import_continues_identically(engine):
    """PD handoff shape: prefill here, export Full Blocks, import as a new request, decode."""
    ids = chat(engine, "Which command lists open ports?", system=SYSTEM)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    expected = engine.generate([ids], params)[0].new_token_ids

    engine.add_request(EngineRequest("prefill", ids, params, tenant_salt=b"pd"))
    first = engine.step()[0]
    kv = engine.export_kv("prefill")
    engine.abort("prefill")
    assert kv.num_tokens == len(ids) and len(kv.block_keys) == len(ids) // 64

    rest = SamplingParams(temperature=0, max_tokens=29, ignore_eos=True)
    with pytest.raises(InvalidRequestError, match="keys"):
        engine.add_request(
            EngineRequest("decode", ids + first.new_token_ids, rest, tenant_salt=b"x", kv=kv)
        )
    engine.add_request(
        EngineRequest("decode", ids + first.new_token_ids, rest, tenant_salt=b"pd", kv=kv)
    )
    tokens = []
    while engine.has_unfinished():
        tokens += [t for o in engine.step() for t in o.new_token_ids]
    assert first.new_token_ids + tokens == expected


def test_min_tokens_defers_eos(engine):
    ids = chat(engine, "What is the capital of France?")
    short = engine.generate([ids], GREEDY)[0]
    longer = engine.generate([ids], SamplingParams(temperature=0, max_tokens=60, min_tokens=20))
    assert short.num_output_tokens < 20 <= longer[0].num_output_tokens
    assert longer[0].text.startswith(short.text)


def test_min_tokens_defers_stop_strings(engine):
    ids = chat(engine, "What is the capital of France?")
    params = SamplingParams(temperature=0, max_tokens=30, stop=["capital"], min_tokens=10)
    out = engine.generate([ids], params)[0]
    assert "capital" in out.text  # not cut before min_tokens


def test_failing_step_ends_its_requests_and_engine_recovers(engine, monkeypatch):
    """A step that raises must not wedge the engine: its requests end with "error"."""
    ids = chat(engine, "Name a colour.")
    engine.add_request(EngineRequest("doomed", ids, GREEDY))

    def boom(plan):
        raise RuntimeError("injected runner failure")

    with monkeypatch.context() as m:
        m.setattr(engine.runner, "run", boom)
        outs = engine.step()
    assert [(o.request_id, o.finished, o.finish_reason) for o in outs] == [
        ("doomed", True, "error")
    ]
    assert not engine.has_unfinished()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.generate([ids], GREEDY)[0].finish_reason == "stop"


def test_import_with_wrong_kv_shape_is_rejected_without_leaking(engine):
    ids = chat(engine, "Which command lists open ports?", system=SYSTEM)
    engine.add_request(EngineRequest("src", ids, SamplingParams(temperature=0, max_tokens=5)))
    engine.step()
    kv = engine.export_kv("src")
    engine.abort("src")
    kv.data = kv.data[:, :-1]  # one layer short
    free = engine.block_manager.num_free_blocks
    with pytest.raises(InvalidRequestError, match="shape"):
        engine.add_request(EngineRequest("dst", [*ids, 42], GREEDY, kv=kv))
    assert engine.block_manager.num_free_blocks == free
    with pytest.raises(InvalidRequestError, match="no unfinished request"):
        engine.export_kv("src")
