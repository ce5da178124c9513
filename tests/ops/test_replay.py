"""`ops replay` inputs: its own trace format, an audit log, and generated agentic traces."""

from __future__ import annotations

import json

from app.audit import AuditRecord, to_line
from ops.cli import main
from ops.replay import Request, Result, load_trace, summarize


def test_trace_file_requests_come_back_in_time_order(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"t": 2.5, "session": "a", "prompt_tokens": 0, "append_tokens": 30, "max_tokens": 8}\n'
        '{"t": 0.0, "session": "a", "prompt_tokens": 500, "max_tokens": 16}\n'
        "\n"
        '{"t": 1.0, "prompt_tokens": 64, "max_tokens": 4, "service_tier": "flex"}\n'
    )
    assert load_trace(path) == [
        Request(0.0, "a", 500, 16),
        Request(1.0, None, 64, 4, "flex"),
        Request(2.5, "a", 0, 8, None, 30),
    ]


def test_an_audit_log_replays_its_successful_requests_at_their_pace(tmp_path):
    def record(t, status, prompt, out, tier="default"):
        return AuditRecord(
            t,
            "r",
            "acme",
            "m",
            "/v1/completions",
            status,
            200,
            tier,
            prompt_tokens=prompt,
            completion_tokens=out,
        )

    path = tmp_path / "audit-2026-11-23.jsonl"
    path.write_text(
        to_line(record(100.0, "ok", 300, 20))
        + to_line(record(101.0, "rejected", 50, 0))
        + to_line(record(103.5, "ok", 40, 5, "priority"))
    )
    assert load_trace(path) == [
        Request(0.0, None, 300, 20, "default"),
        Request(3.5, None, 40, 5, "priority"),
    ]


def test_make_agentic_writes_sessions_whose_later_turns_append(tmp_path):
    path = tmp_path / "agentic.jsonl"
    argv = [
        "replay",
        str(path),
        "--make-agentic",
        "--agents",
        "3",
        "--turns",
        "2",
        "--context",
        "100",
        "--append",
        "20",
        "--gen",
        "10",
    ]
    assert main(argv) == 0
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 6 and len({r["session"] for r in rows}) == 3
    firsts = [r for r in rows if r["prompt_tokens"]]
    later = [r for r in rows if not r["prompt_tokens"]]
    assert len(firsts) == len(later) == 3
    assert all(r["prompt_tokens"] >= 100 and r["append_tokens"] == 0 for r in firsts)
    assert all(15 <= r["append_tokens"] <= 25 for r in later)
    starts = sorted({r["t"] for r in rows})
    assert starts[0] == 0.0 and len(starts) == 3  # agents start one after another


def test_summary_counts_statuses_and_percentiles_per_tier():
    results = [
        Result(None, "default", 200, ttft_s=t, tpot_s=0.01, prompt_tokens=100, cached_tokens=50)
        for t in (0.1, 0.2, 0.3, 0.4)
    ] + [Result(None, "default", 429), Result(None, "flex", 503)]
    summary = summarize(results, 10.0)
    default = summary["tiers"]["default"]
    assert default["statuses"] == {"200": 4, "429": 1}
    assert default["ttft_p50_s"] == 0.3 and default["ttft_p99_s"] == 0.4
    assert default["cached_fraction"] == 0.5
    assert summary["tiers"]["flex"]["statuses"] == {"503": 1}
