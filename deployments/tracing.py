"""OpenTelemetry traces: one trace per request, across every deployment it touches.

Each process (Serve replica) calls `setup_tracing(section, service)` once; later calls are
no-ops, so a test that installed its own provider first keeps it. The ingress opens the
request's root span; the W3C `traceparent` travels in the protocol messages (`trace` fields
of PlanRequest / PrefillJob / DecodeJob, the `trace` argument of TrafficManager.load), and
each deployment opens its spans under it with `span(name, carrier)`. Spans the engine
thread measures (prefill chunks) are recorded after the fact with `record_span`.

Exporters (`tracing.exporter`): `otlp` to `otlp_endpoint` (OTLP/HTTP), `file` (JSON lines,
one file per process and UTC day under `path`, read by `python -m ops trace`), `console`,
`none`; `auto` is OTLP when an endpoint is configured (here or in
$OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT), else file. Sampling is parent-based: the ingress
samples `sample_ratio` of requests and every deployment follows its decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from deployments.options import TracingSection

logger = logging.getLogger(__name__)

tracer = trace.get_tracer("dualpath-serve")
Carrier = dict[str, str]
REQUEST_ID = "dualpath.request_id"  # the attribute `ops trace <request-id>` looks for

_FILE = re.compile(r"spans-(\d{4}-\d{2}-\d{2})-.+\.jsonl")
_lock = threading.Lock()
_installed = False


# ---------------------------------------------------------------------- setup
def setup_tracing(section: TracingSection, service: str) -> bool:
    """Install this process's tracer provider once; True if this call installed it."""
    global _installed
    with _lock:
        if _installed:
            return False
        provider = make_provider(section, service)
        if provider is None:
            return False
        trace.set_tracer_provider(provider)
        _installed = True
        return True


def make_provider(section: TracingSection, service: str) -> TracerProvider | None:
    """A provider with the configured sampler and exporter (None: tracing off)."""
    exporter = make_exporter(section, service) if section.enabled else None
    if exporter is None:
        return None
    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(section.sample_ratio)),
        resource=Resource.create({"service.name": service, **_host_attributes()}),
    )
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
    return provider


def install_provider(provider: TracerProvider) -> None:
    """Use `provider` in this process (tests: an in-memory exporter); setup then no-ops."""
    global _installed
    with _lock:
        trace.set_tracer_provider(provider)
        _installed = True


def make_exporter(section: TracingSection, service: str) -> SpanExporter | None:
    kind = section.exporter
    endpoint = section.endpoint()
    if kind == "auto":
        kind = "otlp" if endpoint else "file"
    if kind == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
    if kind == "file":
        return FileSpanExporter(section.path.expanduser(), service, section.retention_days)
    if kind == "console":
        return ConsoleSpanExporter(service_name=service)
    return None


# ---------------------------------------------------------------------- propagation
def inject() -> Carrier:
    """The current trace context as a W3C carrier (empty when nothing is traced)."""
    carrier: Carrier = {}
    propagate.inject(carrier)
    return carrier


def extract(carrier: Mapping[str, str] | None) -> otel_context.Context:
    """The context a carrier names; with no carrier, the current one (in-process calls)."""
    if not carrier:
        return otel_context.get_current()
    return propagate.extract(dict(carrier))


@contextlib.contextmanager
def span(
    name: str,
    carrier: Mapping[str, str] | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    parent: otel_context.Context | None = None,
    **attributes: Any,
) -> Iterator[Span]:
    """A span under `parent`, else `carrier`'s context, else the current one; current
    inside the block. Exceptions leaving the block mark it failed.

    NOTE: never hold it across a `yield` of an async generator: the consumer may resume
    the generator in another context. Use `start_span` and end it by hand there.
    """
    context = parent if parent is not None else extract(carrier)
    with tracer.start_as_current_span(
        name, context=context, kind=kind, attributes=_clean(attributes)
    ) as current:
        yield current


def start_span(
    name: str,
    parent: otel_context.Context | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
    **attributes: Any,
) -> Span:
    """A span that is not made current: end it yourself (spans that outlive a yield)."""
    return tracer.start_span(name, context=parent, kind=kind, attributes=_clean(attributes))


def carrier_of(current: Span) -> Carrier:
    """The W3C carrier of `current` (to hand to a deployment as its parent)."""
    carrier: Carrier = {}
    propagate.inject(carrier, context=trace.set_span_in_context(current))
    return carrier


def record_span(
    name: str,
    parent: otel_context.Context,
    start_ns: int,
    end_ns: int,
    **attributes: Any,
) -> None:
    """A span measured elsewhere (the engine thread): start and end given in time_ns."""
    done = tracer.start_span(
        name, context=parent, start_time=start_ns, attributes=_clean(attributes)
    )
    done.end(end_time=end_ns)


def end(current: Span) -> None:
    """End `current` unless it has ended already."""
    if current.is_recording():
        current.end()


def fail(current: Span, exc: BaseException) -> None:
    """Mark `current` failed; a cancellation (client gone) is marked cancelled instead."""
    if isinstance(exc, GeneratorExit | asyncio.CancelledError):
        current.set_attribute("dualpath.cancelled", True)
        return
    current.record_exception(exc)
    current.set_status(Status(StatusCode.ERROR, type(exc).__name__))


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    """OTel attributes: drop None, keep str/bool/int/float (others as str)."""
    clean: dict[str, Any] = {}
    for key, value in attributes.items():
        if value is None:
            continue
        clean[key] = value if isinstance(value, str | bool | int | float) else str(value)
    return clean


def _host_attributes() -> dict[str, str]:
    """Where this process runs: its host, and its Ray node when it is a Ray worker (the spans
    of one request come from processes on several Ray nodes of a cluster)."""
    attributes = {"host.name": socket.gethostname()}
    try:
        import ray

        if ray.is_initialized():
            attributes["ray.node_id"] = ray.get_runtime_context().get_node_id()
    except Exception:  # not under Ray, or its runtime context is not ready: host only
        pass
    return attributes


# ---------------------------------------------------------------------- file exporter
def span_record(s: ReadableSpan) -> dict[str, Any]:
    """One finished span as the JSON object the file exporter writes."""
    ctx = s.context
    assert ctx is not None
    return {
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_id": f"{s.parent.span_id:016x}" if s.parent is not None else None,
        "name": s.name,
        "service": s.resource.attributes.get("service.name", ""),
        "ray_node_id": s.resource.attributes.get("ray.node_id", ""),
        "kind": s.kind.name,
        "start_ns": s.start_time,
        "end_ns": s.end_time,
        "status": s.status.status_code.name,
        "attributes": dict(s.attributes or {}),
        "events": [
            {"name": e.name, "time_ns": e.timestamp, "attributes": dict(e.attributes or {})}
            for e in s.events
        ],
    }


class FileSpanExporter(SpanExporter):
    """Spans as JSON lines in `<dir>/spans-<UTC day>-<service>-<pid>.jsonl`: one writer per
    file, so processes never interleave. Files older than `retention_days` are deleted when
    a day's file is opened."""

    def __init__(self, directory: Path, service: str, retention_days: int = 7):
        self.dir = directory
        self.service = re.sub(r"[^A-Za-z0-9_.-]", "_", service)
        self.retention_days = retention_days
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        self._day: date | None = None

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_record(s), default=str) + "\n" for s in spans)
        try:
            with self._lock:
                today = datetime.now(UTC).date()
                if self._file is None or today != self._day:
                    self._open(today)
                assert self._file is not None
                self._file.write(lines)
                self._file.flush()
        except OSError:
            logger.warning("writing %d spans failed", len(spans), exc_info=True)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def _open(self, day: date) -> None:
        if self._file is not None:
            self._file.close()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._purge(day)
        name = f"spans-{day.isoformat()}-{self.service}-{os.getpid()}.jsonl"
        self._file = (self.dir / name).open("a", encoding="utf-8")
        self._day = day

    def _purge(self, today: date) -> None:
        cutoff = today - timedelta(days=self.retention_days)
        for path in self.dir.iterdir():
            match = _FILE.fullmatch(path.name)
            try:
                if match and date.fromisoformat(match.group(1)) < cutoff:
                    path.unlink()
            except (ValueError, OSError) as exc:
                logger.debug("span retention skipped %s: %s", path, exc)
