"""The file exporter and `ops trace`: spans written by several "processes" (providers with
their own service names, as Serve replicas are) are found again by request id, response id
or trace id, rendered as one tree, and old files are deleted by retention."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from rich.console import Console

from deployments.tracing import REQUEST_ID, FileSpanExporter, carrier_of, extract
from ops.cli import main
from ops.traceview import find_trace, render


def tracer_for(service, directory, retention_days=7):
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(
        SimpleSpanProcessor(FileSpanExporter(directory, service, retention_days))
    )
    return provider.get_tracer("test")


def write_request(directory, rid):
    """An ingress root and a prefill engine's child, joined only through the W3C carrier."""
    ingress, engine = (
        tracer_for("dualpath.ingress", directory),
        tracer_for("dualpath.pe", directory),
    )
    root = ingress.start_as_current_span("POST /v1/chat/completions", attributes={REQUEST_ID: rid})
    with root, ingress.start_as_current_span("prefill") as prefill:
        carrier = carrier_of(prefill)
        with engine.start_as_current_span("pe.prefill", context=extract(carrier)) as pe:
            pe.set_attribute("cached_tokens", 128)
            with engine.start_as_current_span("engine.chunk", attributes={"tokens": 64}):
                pass
    return trace.format_trace_id(prefill.get_span_context().trace_id)


def test_spans_are_found_by_any_id_and_rendered_as_one_tree(tmp_path):
    trace_id = write_request(tmp_path, "abc123")
    write_request(tmp_path, "other")  # another request's trace is left out
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(f.startswith("spans-") for f in files)  # one per process
    for ident in ("abc123", "chatcmpl-abc123", "cmpl-abc123", trace_id):
        spans = find_trace(tmp_path, ident)
        assert [s["name"] for s in spans] == [
            "POST /v1/chat/completions",
            "prefill",
            "pe.prefill",
            "engine.chunk",
        ]
        assert {s["trace_id"] for s in spans} == {trace_id}
    assert find_trace(tmp_path, "nope") == []
    spans = find_trace(tmp_path, "abc123")
    by_name = {s["name"]: s for s in spans}
    assert by_name["pe.prefill"]["parent_id"] == by_name["prefill"]["span_id"]
    assert by_name["pe.prefill"]["service"] == "dualpath.pe"
    console = Console(width=200, record=True)
    console.print(render(spans))
    text = console.export_text()
    lines = [line for line in text.splitlines() if "engine.chunk" in line or "pe.prefill" in line]
    assert len(lines) == 2 and "cached_tokens=128" in text and "tokens=64" in text
    # the tree nests: the chunk is indented deeper than its parent
    assert lines[1].index("engine.chunk") > lines[0].index("pe.prefill")


def test_cli_prints_the_tree_or_json_and_fails_for_unknown_ids(tmp_path, capsys):
    write_request(tmp_path, "r1")
    assert main(["trace", "cmpl-r1", "--dir", str(tmp_path), "--json", "--wait", "0"]) == 0
    spans = json.loads(capsys.readouterr().out)
    assert len(spans) == 4
    assert main(["trace", "missing", "--dir", str(tmp_path), "--wait", "0"]) == 1


def test_retention_deletes_only_old_span_files(tmp_path):
    today = datetime.now(UTC).date()
    old = tmp_path / f"spans-{(today - timedelta(days=8)).isoformat()}-dualpath.pe-1.jsonl"
    kept = tmp_path / f"spans-{(today - timedelta(days=7)).isoformat()}-dualpath.pe-1.jsonl"
    other = tmp_path / "notes.txt"
    for p in (old, kept, other):
        p.write_text("")
    write_request(tmp_path, "r2")  # opening today's file applies retention (7 days)
    assert not old.exists() and kept.exists() and other.exists()
    assert any(p.name.endswith(f"-{os.getpid()}.jsonl") for p in tmp_path.iterdir())
