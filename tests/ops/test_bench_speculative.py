"""The speculative benchmark: its traces are deterministic and carry the text they ask to
repeat, and a tiny run writes every cell with its `identical` flag, ratios and plot (no
timing assertions: speed is reported in docs/BENCHMARKS.md, not asserted in tests)."""

from __future__ import annotations

import json

from ops.bench._spec_traces import TRACES, Turn, code_edit_turns, control_turns, take
from ops.bench.speculative import main


def test_traces_are_deterministic_and_non_empty():
    """Every trace builds the same turns on every call, so methods and repeats see the same
    prompts and a rerun measures the same work."""
    for build in TRACES.values():
        first = build()
        assert first and first == build()
        assert all(turn.messages[-1]["role"] == "user" for turn in first)
    assert len(control_turns()) >= 32  # batch 32 runs distinct prompts without cycling


def test_code_edit_prompts_contain_the_source_they_ask_to_repeat():
    """A code-edit reply can copy from its prompt: the function's source is in the first
    message, and a tool-call turn's history holds the earlier edit_file call on that file."""
    turns = code_edit_turns()
    assert len(turns) >= 32
    for turn in turns:
        assert turn.source.startswith("def ")
        assert 10 <= len(turn.source.splitlines()) <= 40
        assert turn.source in turn.messages[0]["content"]
    tool_turns = [t for t in turns if len(t.messages) == 3]
    assert tool_turns
    for turn in tool_turns:
        call = json.loads(turn.messages[1]["content"])
        assert call["name"] == "edit_file"
        assert call["arguments"]["old"] in turn.source
        assert call["arguments"]["new"].startswith(call["arguments"]["old"])


def test_control_prompts_have_nothing_to_copy():
    """Control turns are single open-ended asks with no source attached."""
    assert all(len(t.messages) == 1 and t.source == "" for t in control_turns())


def test_take_cycles_with_a_distinct_suffix():
    """Asking for more turns than a trace has cycles it, each copy made distinct."""
    turns = [Turn(({"role": "user", "content": "a"},)), Turn(({"role": "user", "content": "b"},))]
    contents = [t.messages[-1]["content"] for t in take(turns, 5)]
    assert contents == ["a", "b", "a (variant 2)", "b (variant 2)", "a (variant 3)"]


def test_speculative_bench_writes_every_cell(tiny_model_dir, tmp_path, monkeypatch):
    """A tiny grid (2 traces x batch 1, 2 x 3 methods) writes every cell with its
    `identical` flag and TPOT ratio to off, the targets' verdicts and the PNG."""
    monkeypatch.chdir(tmp_path)
    argv = ["--model", str(tiny_model_dir), "--impl", "fp32", "--threads", "1"]
    argv += ["--batch-sizes", "1,2", "--max-tokens", "8", "--repeats", "1"]
    assert main([*argv, "--plot", str(tmp_path / "spec.png")]) == 0
    (out,) = (tmp_path / "bench-results").glob("speculative-*.json")
    report = json.loads(out.read_text())
    rows = {(r["trace"], r["batch"], r["method"]): r for r in report["rows"]}
    expected = {(t, b, m) for t in TRACES for b in (1, 2) for m in ("off", "ngram", "suffix")}
    assert set(rows) == expected
    for (_, batch, method), row in rows.items():
        assert isinstance(row["identical"], bool)
        assert row["num_requests"] == (3 if batch == 1 else 4)  # at least --min-requests
        assert row["tokens_per_s"] > 0 and row["vs_off"] > 0
        if method == "off":
            assert row["identical"] and row["drafted_tokens"] == 0
    assert rows[("code-edit", 1, "ngram")]["status"] in ("MET", "MISSED")
    assert rows[("control", 2, "suffix")]["status"] in ("MET", "MISSED")
    verdicts = {(v["target"], v["method"]) for v in report["meta"]["targets"]}
    assert verdicts == {
        (target, method)
        for target in ("code-edit bs1", "control every batch")
        for method in ("ngram", "suffix")
    }
    assert report["meta"]["cpu_capability"]
    assert (tmp_path / "spec.png").stat().st_size > 10_000
