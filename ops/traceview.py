"""`python -m ops trace <request-id>`: one request's trace, as a tree with a timeline.

Reads the span files the file exporter writes (`tracing.path`, one file per process and
day; see deployments/tracing.py) on this machine. The id may be the response id
(`chatcmpl-…` / `cmpl-…`), the audit log's `request_id`, the `x-request-id` response header,
the client's `x-client-request-id`, or a 32-hex trace id. With an OTLP collector configured
instead, look the trace up there by its `dualpath.request_id` attribute.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text
from rich.tree import Tree

from deployments.options import TracingSection
from deployments.tracing import REQUEST_ID

IDS = (REQUEST_ID, "serve.request_id", "client_request_id")  # attributes an id may match

BAR = 32  # timeline width in characters
SHOWN = (  # attributes worth a place on the tree line, in this order
    "service_tier",
    "tenant",
    "read_path",
    "side",
    "node",
    "blocks",
    "blocks_read",
    "hit_blocks",
    "prompt_tokens",
    "cached_tokens",
    "tokens",
    "start",
    "batch_seqs",
    "output_tokens",
    "completion_tokens",
    "bytes",
    "via",
    "queued_ms",
    "http.response.status_code",
    "dualpath.cancelled",
)


def request_key(text: str) -> str:
    """The request id inside a response id (`chatcmpl-<id>`, `cmpl-<id>`), else `text`."""
    for prefix in ("chatcmpl-", "cmpl-"):
        if text.startswith(prefix):
            return text[len(prefix) :]
    return text


def _lines(directory: Path) -> Iterator[dict[str, Any]]:
    for path in sorted(directory.glob("spans-*.jsonl")):
        with path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    yield json.loads(line)
                except ValueError:  # a line being written right now
                    continue


def find_trace(directory: Path, ident: str) -> list[dict[str, Any]]:
    """Every span of the trace(s) of request `ident` (or of trace id `ident`), by start."""
    key = request_key(ident)
    traces = {
        s["trace_id"]
        for s in _lines(directory)
        if s["trace_id"] == key or any(s["attributes"].get(a) in (key, ident) for a in IDS)
    }
    found = [s for s in _lines(directory) if s["trace_id"] in traces]
    return sorted(found, key=lambda s: s["start_ns"])


def render(spans: list[dict[str, Any]]) -> Tree:
    """A tree of spans (children by start time), each with its offset, duration, a bar on
    the trace's timeline, its service and its telling attributes."""
    by_id = {s["span_id"]: s for s in spans}
    children: dict[str | None, list[dict[str, Any]]] = defaultdict(list)
    for s in spans:
        parent = s["parent_id"] if s["parent_id"] in by_id else None
        children[parent].append(s)
    t0 = min(s["start_ns"] for s in spans)
    t1 = max(s["end_ns"] for s in spans)
    scale = BAR / max(t1 - t0, 1)
    roots = children[None]
    title = Text.assemble(
        ("trace ", "bold"),
        (roots[0]["trace_id"], "cyan"),
        f"  {len(spans)} spans, {len({s['service'] for s in spans})} services, ",
        (f"{(t1 - t0) / 1e6:.1f} ms", "bold"),
    )
    tree = Tree(title)

    def label(s: dict[str, Any]) -> Text:
        start, end = s["start_ns"] - t0, s["end_ns"] - t0
        a = int(start * scale)
        b = max(a + 1, int(end * scale))
        bar = " " * a + "█" * (b - a) + " " * (BAR - b)
        failed = s.get("status") == "ERROR"
        attrs = s.get("attributes", {})
        shown = " ".join(f"{k}={attrs[k]}" for k in SHOWN if k in attrs)
        return Text.assemble(
            (f"{bar[:BAR]} ", "red" if failed else "green"),
            (f"{s['name']:<22}", "bold red" if failed else "bold"),
            (f"{start / 1e6:9.1f} +{(end - start) / 1e6:8.1f} ms  ", ""),
            (f"{s['service']:<24} ", "dim"),
            (shown, "cyan"),
        )

    def add(node: Tree, s: dict[str, Any]) -> None:
        branch = node.add(label(s))
        for child in children[s["span_id"]]:
            add(branch, child)

    for root in roots:
        add(tree, root)
    return tree


def _cmd_trace(args: argparse.Namespace) -> int:
    console = Console()
    directory = Path(args.dir).expanduser()
    deadline = time.monotonic() + args.wait
    spans = find_trace(directory, args.request_id)
    while not spans and time.monotonic() < deadline:  # spans are exported within ~1 s
        time.sleep(0.5)
        spans = find_trace(directory, args.request_id)
    if not spans:
        console.print(f"[red]no spans for {args.request_id!r} under {directory}[/]")
        return 1
    if args.json:
        print(json.dumps(spans, indent=1))
    else:
        console.print(render(spans))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    trace = sub.add_parser("trace", help="one request's spans as a tree (file exporter)")
    trace.add_argument("request_id", help="x-request-id, chatcmpl-/cmpl- id, or trace id")
    trace.add_argument(
        "--dir", default=str(TracingSection().path), help="tracing.path of the running app"
    )
    trace.add_argument("--wait", type=float, default=3.0, help="seconds to wait for spans")
    trace.add_argument("--json", action="store_true", help="print the spans as JSON")
    trace.set_defaults(func=_cmd_trace)
