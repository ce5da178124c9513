"""EngineCore end to end on a tiny random-weight Llama (tests/helpers.py), a fresh engine
per test: outputs are compared with the engine's own runs, so exact counts hold. What needs
real weights (the model knows Paris, parity with transformers) is in test_hf_parity.py."""

from __future__ import annotations

import json
import shutil

import pytest

from engine import EngineConfig, EngineCore, EngineRequest, InvalidRequestError, SamplingParams
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


@pytest.fixture
def engine(tiny_engine) -> EngineCore:
    return tiny_engine


@pytest.fixture
def small_engine(tiny_model_dir) -> EngineCore:
    """Tiny pool (24 blocks x 16 tokens) and a 32-token step budget: forces chunked prefill
    and preemption with short prompts."""
    return EngineCore(
        EngineConfig(
            model=tiny_model_dir,
            num_threads=1,
            block_size=16,
            num_kv_blocks=24,
            max_num_batched_tokens=32,
            max_num_seqs=8,
        )
    )


def _ascii_word(text: str, start: int) -> str:
    """The first 3-letter ASCII run in `text` from `start` on (random weights give random
    text: a stop string the detokenizer shows whole)."""
    for i in range(start, len(text) - 2):
        if text[i : i + 3].isascii() and text[i : i + 3].isalpha():
            return text[i : i + 3]
    raise AssertionError(f"no 3-letter ASCII run in {text!r}")


def test_prefix_cache_hit_gives_identical_output(engine):
    """A second turn sharing a long prefix is served from cached blocks, with the same reply;
    every full block of the prompt hits but the last token's (its logits are needed)."""
    bs = engine.config.block_size
    ids = chat(engine, "Which command shows disk usage?", system=SYSTEM)
    assert len(ids) > 3 * bs
    first = engine.generate([ids], GREEDY)[0]
    assert first.num_cached_tokens == 0
    second = engine.generate([ids], GREEDY)[0]
    assert second.num_cached_tokens == (len(ids) - 1) // bs * bs
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
    got = [o.new_token_ids for o in small_engine.generate(prompts, params)]
    assert small_engine.scheduler.num_preemptions > 0
    assert got == expected
    assert small_engine.block_manager.num_free_blocks == small_engine.block_manager.num_blocks


def test_abort_frees_blocks(engine):
    bm = engine.block_manager
    free_before = bm.num_free_blocks
    assert free_before == bm.num_blocks
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
    """The reply ends just before the first occurrence of the stop string, and no streamed
    delta ever carried any of it."""
    ids = chat(engine, "What is the capital of France?")
    full = engine.generate([ids], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    text = full[0].text
    stop = _ascii_word(text, len(text) // 2)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])
    outs = _run(engine, "stop", ids, params)
    final = outs[-1]
    assert final.finish_reason == "stop"
    assert final.text == text[: text.index(stop)]
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
        ([1] * 9000, None, "context"),
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
    assert kv.num_tokens == len(ids) and len(kv.block_keys) == len(ids) // engine.config.block_size

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


def test_min_tokens_defers_eos(engine, tiny_model_dir, tmp_path):
    """An engine whose EOS is the 4th greedy token stops there; with min_tokens=20 the EOS is
    masked until then, and the reply goes on from the same first 3 tokens."""
    ids = chat(engine, "What is the capital of France?")
    free_run = engine.generate([ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    tokens = free_run[0].new_token_ids
    assert tokens[3] not in tokens[:3]
    model = tmp_path / "eos-at-4"  # the same weights, one more EOS id
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"eos_token_id": [2, tokens[3]]}))
    eos_at_4 = EngineCore(EngineConfig(model=model, num_threads=1, block_size=16, num_kv_blocks=64))
    (short,) = eos_at_4.generate([ids], GREEDY)
    (longer,) = eos_at_4.generate(
        [ids], SamplingParams(temperature=0, max_tokens=60, min_tokens=20)
    )
    assert short.new_token_ids == tokens[:4] and short.finish_reason == "stop"
    assert longer.num_output_tokens >= 20 and longer.new_token_ids[:3] == tokens[:3]
    assert tokens[3] not in longer.new_token_ids[:19]  # EOS could not be drawn before 20


def test_min_tokens_defers_stop_strings(engine):
    """A stop string in the first tokens cuts the reply there, but not before min_tokens."""
    ids = chat(engine, "What is the capital of France?")
    free_run = engine.generate([ids], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    early = engine.tokenizer.decode(free_run[0].new_token_ids[:5])
    stop = _ascii_word(early, 0)
    cut = engine.generate([ids], SamplingParams(temperature=0, max_tokens=30, stop=[stop]))[0]
    assert stop not in cut.text and cut.finish_reason == "stop"  # the stop string works here
    params = SamplingParams(temperature=0, max_tokens=30, stop=[stop], min_tokens=10)
    out = engine.generate([ids], params)[0]
    assert stop in out.text  # not cut before min_tokens


def test_failing_step_ends_its_requests_and_engine_recovers(engine, monkeypatch):
    """A step that raises must not wedge the engine: its requests end with "error"."""
    ids = chat(engine, "Name a colour.")
    (healthy,) = engine.generate([ids], GREEDY)
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
    assert engine.generate([ids], GREEDY)[0].new_token_ids == healthy.new_token_ids


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
