"""Exporter choice and sampling as configured: OTLP/HTTP really reaches a collector (a local
HTTP server parsing the protobuf), `auto` falls back to files, and `sample_ratio` decides
for the whole trace (children follow their parent)."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from deployments.options import TracingSection
from deployments.tracing import FileSpanExporter, carrier_of, extract, make_exporter, make_provider


class Collector(BaseHTTPRequestHandler):
    received: list[ExportTraceServiceRequest] = []

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["content-length"]))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        Collector.received.append(request)
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_otlp_exporter_sends_spans_to_the_configured_collector():
    server = HTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1/traces"
        section = TracingSection(otlp_endpoint=url)  # exporter "auto" → OTLP
        provider = make_provider(section, "dualpath.test")
        assert isinstance(make_exporter(section, "x"), OTLPSpanExporter)
        tracer = provider.get_tracer("t")
        with tracer.start_as_current_span("choice"), tracer.start_as_current_span("prefill"):
            pass
        provider.force_flush()
        provider.shutdown()
    finally:
        server.shutdown()

    def service(resource) -> str:
        (name,) = [a.value.string_value for a in resource.attributes if a.key == "service.name"]
        return name

    spans = [
        (s.name, service(r.resource))
        for req in Collector.received
        for r in req.resource_spans
        for scope in r.scope_spans
        for s in scope.spans
    ]
    assert sorted(spans) == [("choice", "dualpath.test"), ("prefill", "dualpath.test")]


def test_exporter_choice(tmp_path, monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert isinstance(make_exporter(TracingSection(path=tmp_path), "s"), FileSpanExporter)
    assert isinstance(make_exporter(TracingSection(exporter="console"), "s"), ConsoleSpanExporter)
    assert make_exporter(TracingSection(exporter="none"), "s") is None
    assert make_provider(TracingSection(enabled=False), "s") is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert isinstance(make_exporter(TracingSection(path=tmp_path), "s"), OTLPSpanExporter)


def test_sampling_ratio_decides_per_trace_and_children_follow(tmp_path):
    def traced(ratio: float, n: int = 400) -> tuple[int, int]:
        provider = make_provider(TracingSection(sample_ratio=ratio, path=tmp_path), "s")
        memory = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(memory))
        tracer = provider.get_tracer("t")
        for _ in range(n):
            root = tracer.start_span("root")
            # a child in "another process": only the carrier crosses
            with tracer.start_as_current_span("child", context=extract(carrier_of(root))):
                pass
            root.end()
        names = [s.name for s in memory.get_finished_spans()]
        provider.shutdown()
        return names.count("root"), names.count("child")

    assert traced(0.0) == (0, 0)
    assert traced(1.0) == (400, 400)
    roots, children = traced(0.25)
    assert roots == children and 60 <= roots <= 140  # 100 expected; binomial sd ≈ 8.7
