"""The pure parts of the server-level peer benchmark (ops/bench/serve_peer.py): prompts, the
request body each server gets, a record from a stream's chunks, the rows and the ratios.
No server is started here."""

from __future__ import annotations

import pytest

from ops.bench import serve_peer
from ops.bench.serve_peer import (
    PROMPT_STRIDE,
    RequestRecord,
    Side,
    add_ratios,
    build_prompts,
    parse_stream,
    request_body,
    summarise,
)


def test_prompts_are_unique_slices_of_the_corpus_of_the_asked_length():
    """Both servers get the same prompts; no prompt may share a first token position with
    another, or a prefix cache could serve part of it."""
    corpus = list(range(1000))
    prompts = build_prompts(corpus, num_tokens=8, count=5)
    assert prompts[1] == list(range(PROMPT_STRIDE, PROMPT_STRIDE + 8))
    assert all(len(p) == 8 for p in prompts)
    assert len({p[0] for p in prompts}) == 5
    with pytest.raises(ValueError, match="too short"):
        build_prompts(corpus, num_tokens=8, count=11)


def test_bodies_send_the_same_tokens_and_sampling_and_only_llamacpp_skips_its_cache():
    """The two bodies differ only where the servers do: ours names the served model (its
    schema forbids unknown keys), llama.cpp is told not to reuse a slot's cached prompt."""
    ours = request_body(Side.OURS, [5, 6, 7], max_tokens=4)
    peer = request_body(Side.LLAMACPP, [5, 6, 7], max_tokens=4)
    shared = {
        "prompt": [5, 6, 7],
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert ours == shared | {"model": serve_peer.MODEL}
    assert peer == shared | {"cache_prompt": False}


def _chunk(text: str = "", finish: str | None = None, usage: int | None = None) -> dict:
    chunk: dict = {"choices": [{"text": text, "finish_reason": finish}]}
    if usage is not None:
        chunk["usage"] = {"completion_tokens": usage}
    return chunk


def test_record_times_first_and_last_token_and_counts_from_usage():
    """TTFT is the first chunk with text (not a leading empty one); the last token is the
    finish chunk; TPOT spreads the gap over tokens - 1; the usage chunk has no choices."""
    events = [
        (0.05, _chunk()),
        (0.10, _chunk(" a")),
        (0.20, _chunk(" b")),
        (0.30, _chunk(" c")),
        (0.40, _chunk("", finish="length")),
        (0.41, {"choices": [], "usage": {"completion_tokens": 4}}),
    ]
    record = parse_stream(events, max_tokens=4)
    assert record == RequestRecord(ttft_s=0.10, last_token_s=0.40, num_tokens=4)
    assert record.tpot_s == pytest.approx(0.1)


def test_record_refuses_a_stream_that_stopped_short():
    """EOS must be ignored on both sides: a shorter answer would flatter the server."""
    events = [(0.1, _chunk(" a")), (0.2, _chunk("", finish="stop", usage=3))]
    with pytest.raises(ValueError, match="3 tokens, expected 4"):
        parse_stream(events, max_tokens=4)


def test_row_takes_percentiles_of_records_and_throughput_over_the_wall_time():
    """Output tok/s is all generated tokens over the closed loop's wall time, not a mean of
    per-request rates."""
    records = [RequestRecord(t, t + 0.7, 8) for t in (0.1, 0.2, 0.3, 0.4, 0.5)]
    row = summarise(Side.LLAMACPP, "-t 2", "32+8 tok", 2, records, wall_s=4.0)
    assert row["impl"] == "llama.cpp"
    assert row["requests"] == 5
    assert row["ttft_p50_ms"] == pytest.approx(300)
    assert row["ttft_p90_ms"] == pytest.approx(500)
    assert row["tpot_p50_ms"] == pytest.approx(100)
    assert row["out_tok_per_s"] == pytest.approx(10.0)
    assert set(serve_peer.COLUMNS) - {"tok_s_vs_llamacpp", "ttft_p50_vs_llamacpp"} <= row.keys()


def test_ratios_are_ours_over_llamacpp_at_the_same_client_count():
    """Each of our rows is divided by the llama.cpp row of its own client count; llama.cpp
    rows and a count llama.cpp lacks get no ratio."""
    rows = [
        {"impl": Side.LLAMACPP, "clients": 1, "out_tok_per_s": 50.0, "ttft_p50_ms": 40.0},
        {"impl": Side.LLAMACPP, "clients": 8, "out_tok_per_s": 200.0, "ttft_p50_ms": 80.0},
        {"impl": Side.OURS, "clients": 1, "out_tok_per_s": 25.0, "ttft_p50_ms": 60.0},
        {"impl": Side.OURS, "clients": 8, "out_tok_per_s": 300.0, "ttft_p50_ms": 40.0},
        {"impl": Side.OURS, "clients": 32, "out_tok_per_s": 400.0, "ttft_p50_ms": 90.0},
    ]
    out = add_ratios(rows)
    assert [r.get("tok_s_vs_llamacpp") for r in out] == [None, None, 0.5, 1.5, None]
    assert [r.get("ttft_p50_vs_llamacpp") for r in out] == [None, None, 1.5, 0.5, None]
