"""Stored KV into the engine: a prompt's leading blocks imported layer by layer (PrefixKV),
the PD handoff that sends only the blocks the DE lacks, and per-block persistence.

Greedy output must be token-identical whichever way the KV arrived (computed here, read
from the store on the PE side, split between both sides, or no cache at all)."""

from __future__ import annotations

import pytest
import torch

from engine import EngineConfig, EngineCore
from engine.errors import InvalidRequestError
from engine.kv_import import PrefixKV
from engine.request import EngineRequest
from engine.sampling_params import SamplingParams
from tests.helpers import chat

TEXT = (
    "You are reviewing a pull request in a large Python service. The change adds a retry "
    "loop around a flaky network call, a cache for configuration lookups, and a new metric "
    "for queue depth. List the risks of each part, say which tests you would add, and "
    "explain how you would roll it out safely to production over a week. Be concrete. "
) * 4
GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture
def engine(tiny_engine):
    """A fresh engine on the toy model (the sender: computes what the store would hold)."""
    return tiny_engine


@pytest.fixture
def receiver(tiny_model_dir):
    """A fresh engine without a local prefix cache, so stored KV is always imported."""
    return EngineCore(
        EngineConfig(
            model=tiny_model_dir,
            num_threads=1,
            block_size=16,
            num_kv_blocks=256,
            enable_prefix_caching=False,
        )
    )


def run(engine, rid, prompt, params=GREEDY, **kwargs):
    engine.add_request(EngineRequest(rid, prompt, params, **kwargs))
    tokens, final = [], None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid:
                tokens.extend(out.new_token_ids)
                final = out if out.finished else final
    return tokens, final


def stored_blocks(engine, prompt):
    """The prompt's Full Blocks and keys, as the KV store would hold them."""
    engine.add_prefill(
        EngineRequest("store-src", prompt, SamplingParams(temperature=0, max_tokens=2))
    )
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    kv = outs[-1].kv
    assert kv is not None
    return kv.block_keys, list(kv.data[: len(kv.block_keys)].unbind(0))


def test_imported_prefix_gives_identical_greedy_output(engine, receiver):
    prompt = chat(engine, TEXT)
    keys, blocks = stored_blocks(engine, prompt)
    assert len(keys) >= 4
    expected, _ = run(receiver, "scratch", prompt)
    assert receiver.import_totals.num_blocks == 0
    n = len(keys) - 1
    tokens, final = run(receiver, "stored", prompt, prefix=PrefixKV(keys[:n], blocks[:n]))
    assert tokens == expected
    assert final.num_cached_tokens == n * receiver.config.block_size
    totals = receiver.import_totals
    assert totals.num_blocks == n
    assert totals.copy_s > 0 and 0.0 <= totals.overlap <= 1.0


def test_prefix_covering_the_whole_prompt_still_computes_one_token(engine, receiver):
    bs = engine.config.block_size
    prompt = chat(engine, TEXT)
    keys, blocks = stored_blocks(engine, prompt)
    exact = prompt[: len(keys) * bs]  # a prompt of exactly the stored blocks
    expected, _ = run(receiver, "scratch-exact", exact)
    tokens, final = run(receiver, "exact", exact, prefix=PrefixKV(keys, blocks))
    assert tokens == expected
    assert final.num_cached_tokens == (len(keys) - 1) * bs


@pytest.mark.parametrize("num_de_blocks", [0, 2, "all"], ids=["pe-read", "split", "de-read"])
def test_pd_with_stored_prefix_sends_only_what_the_de_lacks(engine, receiver, num_de_blocks):
    """PE (receiver) imports hit blocks; DE (engine) holds the first `num_de_blocks` already and
    gets the rest from the PE. Output equals a single engine computing everything."""
    prompt = chat(engine, TEXT + " Also mention observability.")
    keys, blocks = stored_blocks(engine, prompt)
    hits = len(keys) - 1
    s = hits if num_de_blocks == "all" else num_de_blocks
    expected, _ = run(receiver, "single", prompt)

    receiver.add_prefill(
        EngineRequest(
            "pe", prompt, GREEDY, prefix=PrefixKV(keys[:hits], blocks[:hits]), num_de_blocks=s
        )
    )
    outs = []
    while receiver.has_unfinished():
        outs.extend(receiver.step())
    (first,) = outs
    kv = first.kv
    assert kv.num_de_blocks == s
    assert kv.data.shape[0] == -(-len(prompt) // receiver.config.block_size) - s
    tokens, _ = run(engine, "de", prompt, kv=kv, prefix=PrefixKV(keys[:s], blocks[:s]))
    assert first.new_token_ids + tokens == expected


def test_persist_hands_over_every_block_that_fills(engine, receiver):
    prompt = chat(engine, TEXT)
    keys, blocks = stored_blocks(engine, prompt)
    receiver.drain_persist()
    params = SamplingParams(temperature=0, max_tokens=140, ignore_eos=True)
    run(receiver, "persist", prompt, params, persist_from_block=1)
    out = receiver.drain_persist()
    bs = receiver.config.block_size
    full = (len(prompt) + params.max_tokens - 1) // bs  # the last token has no KV yet
    assert [k for k, _ in out] == _chain(receiver, prompt, out)[1:full]
    # the prompt's blocks equal what another engine computed for them
    for (key, data), (ref_key, ref) in zip(
        out, list(zip(keys, blocks, strict=True))[1:], strict=False
    ):
        assert key == ref_key
        torch.testing.assert_close(data, ref, rtol=1e-4, atol=1e-4)


def _chain(engine, prompt, out):
    from kvstore.keys import chain_keys, root_key

    return chain_keys(root_key(engine.model_id), prompt, engine.config.block_size)[:1] + [
        k for k, _ in out
    ]


def test_prefix_with_wrong_keys_or_shape_is_refused(engine, receiver):
    prompt = chat(engine, TEXT)
    keys, blocks = stored_blocks(engine, prompt)
    with pytest.raises(InvalidRequestError, match="keys"):
        receiver.add_request(
            EngineRequest("bad", prompt, GREEDY, prefix=PrefixKV([b"x" * 16], blocks[:1]))
        )
    with pytest.raises(InvalidRequestError, match="bfloat16"):
        receiver.add_request(
            EngineRequest(
                "bad", prompt, GREEDY, prefix=PrefixKV(keys[:1], [blocks[0].to(torch.bfloat16)])
            )
        )
    with pytest.raises(InvalidRequestError, match="shape"):  # a block one layer short
        receiver.add_request(
            EngineRequest("bad", prompt, GREEDY, prefix=PrefixKV(keys[:1], [blocks[0][:-1]]))
        )
    assert not receiver.has_unfinished()
