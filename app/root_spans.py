"""Root spans: one per request the ingress receives, named by its request id.

The request id is made here, once, and never taken from the client (the engines key requests
by it, so a client-chosen id could collide with, or abort, someone else's request). It is the
response's `id` (`chatcmpl-<id>`), the engines' request id, the audit line's `request_id` and
the root span's `dualpath.request_id`. Serve's own `x-request-id` (the response header; the
client's value when it sent one) and an `x-client-request-id` header are recorded on the root
span too, so `python -m ops trace` finds the trace from any of them. A W3C `traceparent`
header from the client makes the request part of the client's trace. No Ray here.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from typing import Any

from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from app.audit import AuditRecord
from app.pii import mask
from deployments import tracing

_CLIENT_ID = re.compile(r"[\x21-\x7e]{1,128}")  # printable ASCII, as OpenAI limits it


def _printable(value: str | None) -> str | None:
    """A client-chosen id, if it is one (printable, short), with personal data masked."""
    return mask(value) if value and _CLIENT_ID.fullmatch(value) else None


class RootSpans:
    def __init__(self) -> None:
        self.open: dict[str, Span] = {}  # request id -> its root span, until it ends

    def start(self, name: str, route: str, headers: Mapping[str, str] | None = None) -> str:
        """A new request id and its root span (a SERVER span; not made current here)."""
        request_id = uuid.uuid4().hex
        headers = headers or {}
        parent = propagate.extract(dict(headers)) if "traceparent" in headers else None
        self.open[request_id] = tracing.start_span(
            name,
            parent,
            kind=SpanKind.SERVER,
            **{
                tracing.REQUEST_ID: request_id,
                "http.route": route,
                "serve.request_id": _printable(headers.get("x-request-id")),
                "client_request_id": _printable(headers.get("x-client-request-id")),
            },
        )
        return request_id

    def span(self, request_id: str) -> Span:
        return self.open[request_id]

    def annotate(self, record: AuditRecord) -> None:
        """What the request was and used (its audit record), on its root span."""
        root = self.open.get(record.request_id)
        if root is None:
            return
        root.set_attributes(
            {
                "tenant": record.tenant,
                "status": record.status,
                "service_tier": record.service_tier or "",
                "prompt_tokens": record.prompt_tokens,
                "cached_tokens": record.cached_tokens,
                "completion_tokens": record.completion_tokens,
                "cost": record.cost,
            }
        )

    def end(self, request_id: str, status: int, exc: BaseException | None = None) -> None:
        """End the root span with the HTTP status the client got (5xx marks it failed)."""
        root = self.open.pop(request_id, None)
        if root is None:
            return
        root.set_attribute("http.response.status_code", status)
        if exc is not None and status >= 500:
            root.record_exception(exc)
        if status >= 500:
            root.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
        root.end()


def current(span: Span) -> Any:
    """Make `span` current for a block with no `yield` in it. Errors are not recorded here:
    `RootSpans.end` records them with the status the client got."""
    return trace.use_span(
        span, end_on_exit=False, record_exception=False, set_status_on_exception=False
    )
