"""Frontend: everything behind the Ingress shell, with no Ray in it.

It owns the request's edge: the root span (app.root_spans), API key → tenant, the body and
its tier, error → OpenAI error, and hands the request to ChatService. One wrapper serves
the handle API (`serve`), one the HTTP generation routes (`generate`); the Gate is the one
auditor (`_refusals` hands it what is refused before admission). It also feeds admission
the engines' capacity, polled from the Scheduler.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from app.admission.capacity import Capacity
from app.admission.gate import Caller, Gate, Meter
from app.admission.queues import AdmissionQueue
from app.admission.ratelimit import RateLimiter
from app.api.errors import to_api_error
from app.api.http import error_response, openapi_with_bodies, read_json, sse
from app.api.replies import ModelCard, ModelList, dump
from app.api.responses import GenerateRequest, ResponsesRequest
from app.api.schemas import ChatCompletionRequest
from app.audit import AuditLog, AuditRecord
from app.auth import Authenticator, Tenant
from app.choice_flow import ModelInfo, RecoveryPolicy
from app.cluster import Cluster, ClusterStatus
from app.config import AppConfig
from app.ledger import Ledger
from app.outcome_metrics import observe_outcome
from app.pii import PIIFilter
from app.pricing import PriceBook
from app.response_store import ResponseStore
from app.responses import Responses
from app.root_spans import RootSpans, current
from app.service import ChatService
from app.usage_api import usage_page
from deployments import tracing
from deployments.metrics import Metrics
from engine.config import ModelConfig
from engine.loader import engine_model_id
from engine.tokenizer import Tokenizer

logger = logging.getLogger("app.ingress")
Method = Callable[[Any, Caller], Any]  # a ChatService entry: (request, caller) -> reply(s)


class Frontend:
    def __init__(
        self,
        config: AppConfig,
        cluster: Cluster,
        status: ClusterStatus,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ):
        model_dir = config.model.path.expanduser()
        model_config = ModelConfig.from_dir(model_dir)
        engine_config = config.engine.engine_config(config.model, None)
        self.config, self.status, self.metrics = config, status, metrics
        self.auth = Authenticator(config.auth)
        prices = PriceBook(config.pricing)
        self.queue = AdmissionQueue(config.admission, prices.calendar, clock)
        ledger_path = config.ingress.ledger_path
        self.ledger = Ledger(ledger_path.expanduser() if ledger_path else None)
        self.audit = AuditLog(config.audit)
        limiter = RateLimiter(clock)
        name = config.model.name
        self.gate = Gate(self.queue, limiter, prices, self.ledger, name, clock, self._outcome)
        tracing.setup_tracing(config.tracing, "dualpath.ingress")
        self.roots = RootSpans()
        for handler in logging.getLogger().handlers + logging.getLogger("ray.serve").handlers:
            handler.addFilter(PIIFilter())  # nothing personal reaches a log line
        self._capacity_task: asyncio.Task[None] | None = None
        self._openapi: dict[str, Any] | None = None  # built on first use
        model = ModelInfo(
            name,
            engine_config.resolve_max_model_len(model_config),
            model_config.vocab_size,
            engine_model_id(engine_config),
            config.engine.block_size,
        )
        recovery = RecoveryPolicy(config.kvstore.load_failure, config.ingress.max_replica_retries)
        self.service = ChatService(
            Tokenizer(model_dir),
            model,
            cluster,
            config.ingress.default_max_tokens,
            self.gate,
            config.ingress.max_tokens_limit,
            recovery,
        )
        store = ResponseStore(max_tokens=config.ingress.response_store_tokens)
        self.service.responses = Responses(store)

    # ------------------------------------------------------------------ the handle API
    async def call(self, api_key: str | None, request: GenerateRequest) -> Any:
        """A handle call's whole response (audited as route "handle:chat" / "handle:complete")."""
        route = _handle_route(request)
        (response,) = [r async for r in self._serve(route, api_key, request, self.service.respond)]
        return response

    def stream(self, api_key: str | None, request: GenerateRequest) -> AsyncIterator[Any]:
        """A streaming handle call's chunks ("handle:chat_stream" / "handle:complete_stream")."""
        route = _handle_route(request) + "_stream"
        return self._serve(route, api_key, request, self.service.stream)

    async def _serve(
        self, route: str, api_key: str | None, request: GenerateRequest, method: Method
    ) -> AsyncIterator[Any]:
        """One handle call: its root span, key → tenant → tier, then `method`'s replies (a
        unary method's one reply, or a stream's chunks)."""
        rid = self.roots.start(route, route)
        status, error = 200, None
        try:
            with current(self.roots.span(rid)):  # never held across a yield
                with self._refusals(rid, route):
                    tenant = self.auth.authenticate(api_key)
                caller = self._caller(rid, route, tenant, request)
                replies = method(request, caller)  # a stream, or a coroutine of one reply
                if not isinstance(replies, AsyncIterator):
                    replies = _once(replies)
                first = await anext(replies, None)
            async with contextlib.aclosing(replies):  # type: ignore[type-var]
                if first is not None:
                    yield first
                async for reply in replies:
                    yield reply
        except BaseException as exc:
            status, error = _status(exc), exc
            raise
        finally:
            self.roots.end(rid, status, error)

    async def models(self, api_key: str | None) -> ModelList:
        self.auth.authenticate(api_key)
        info = self.service.model
        return ModelList(data=[ModelCard(id=info.name, max_model_len=info.max_model_len)])

    # ------------------------------------------------------------------ HTTP
    async def generate(self, http: Request, schema: type[GenerateRequest]) -> Response:
        """POST /v1/chat/completions, /v1/completions, /v1/responses: key → body → tier →
        admission →
        JSON, or SSE once the first chunk exists (errors before any token become a status
        code). Known tenants get `x-ratelimit-*` headers on every answer, refusals too."""
        route = http.url.path
        rid = self.roots.start(f"POST {route}", route, http.headers)
        tenant: Tenant | None = None
        try:
            with current(self.roots.span(rid)):
                with self._refusals(rid, route):
                    tenant = self.auth.authenticate(http.headers.get("authorization"))
                with self._refusals(rid, route, tenant):
                    body = await read_json(http, self.config.ingress.max_body_bytes)
                    request = schema.model_validate(body)
                caller = self._caller(rid, route, tenant, request)
                if not request.stream:
                    response = await self.service.respond(request, caller)
                    self.roots.end(rid, 200)
                    return JSONResponse(dump(response), headers=self.gate.headers(tenant))
                stream = self.service.stream(request, caller)
                first = await anext(stream)
        except Exception as exc:
            self.roots.end(rid, to_api_error(exc).status, exc)
            return error_response(exc, self.gate.headers(tenant) if tenant else None)
        except BaseException:  # cancelled: the client went away
            self.roots.end(rid, 499)
            raise
        return StreamingResponse(
            sse(first, stream, lambda: self.roots.end(rid, 200)),
            media_type="text/event-stream",
            headers=self.gate.headers(tenant),
        )

    async def http_models(self, http: Request) -> Response:
        try:
            return JSONResponse(dump(await self.models(http.headers.get("authorization"))))
        except Exception as exc:
            return error_response(exc)

    async def http_response(self, http: Request, response_id: str) -> Response:
        """GET /v1/responses/{id}: a stored response of the caller's."""
        try:
            tenant = self.auth.authenticate(http.headers.get("authorization"))
            stored = self.service.responses.store.get(response_id, tenant.name)
            return JSONResponse(dump(stored.response))
        except Exception as exc:
            return error_response(exc)

    async def http_usage(self, http: Request) -> Response:
        try:
            tenant = self.auth.authenticate(http.headers.get("authorization"))
            page = usage_page(self.ledger, tenant, self.auth.open, http.query_params)
            return JSONResponse(page)
        except Exception as exc:
            return error_response(exc)

    def openapi(self, api: FastAPI) -> Response:
        """The API contract as this replica serves it: the routes of `api`, each POST's
        JSON body limited to the served model and this server's limits, every error."""
        if self._openapi is None:
            model, limit = self.service.model, self.config.ingress.max_tokens_limit
            document = openapi_with_bodies(api, [model.name], limit, model.vocab_size)
            self._openapi = document()
        return JSONResponse(self._openapi)

    def docs(self) -> Response:
        html: HTMLResponse = get_swagger_ui_html(
            openapi_url="/openapi.json", title="dualpath-serve"
        )
        return html

    async def health(self) -> Response:
        engines = await self.status.engines()
        code = 200 if {"prefill", "decode"} <= {e.role for e in engines} else 503
        body = {"status": "ok" if code == 200 else "starting", "engines": len(engines)}
        return JSONResponse(body, status_code=code)

    # ------------------------------------------------------------------ admission
    @contextlib.contextmanager
    def _refusals(self, rid: str, route: str, tenant: Tenant | None = None) -> Iterator[None]:
        """What fails in the block was refused before admission: the Gate audits it."""
        try:
            yield
        except Exception as exc:
            self.gate.refuse(rid, route, tenant, exc)
            raise

    def _caller(self, rid: str, route: str, tenant: Tenant, request: GenerateRequest) -> Caller:
        with self._refusals(rid, route, tenant):
            tier = Gate.tier(tenant, request.service_tier)
        self._watch_capacity()
        return Caller(tenant, tier, route, rid)

    def _outcome(self, record: AuditRecord, meter: Meter | None) -> None:
        """One request's end: its audit line, its metrics, its root span's attributes."""
        self.audit.write(record)
        observe_outcome(self.metrics, record, meter)
        self.roots.annotate(record)

    def _watch_capacity(self) -> None:
        if self._capacity_task is None or self._capacity_task.done():
            self._capacity_task = asyncio.get_running_loop().create_task(self._poll_capacity())

    async def _poll_capacity(self) -> None:
        """Feed the admission queue the engines' budget and load, as the Scheduler sees it."""
        section = self.config.admission
        while True:
            for tier, depth in self.queue.depth().items():
                self.metrics.set("dualpath_queue_depth", depth, service_tier=tier)
            try:
                reports = await self.status.engines()
                reads = await self.status.read_capacity()
                rate = section.default_prefill_tokens_per_s
                prefill_s, read_s = section.prefill_queue_s, section.read_queue_s
                capacity = Capacity.from_reports(reports, prefill_s, rate, reads, read_s)
                self.queue.update_capacity(capacity)
            except Exception:
                logger.warning("engine loads unavailable for admission", exc_info=True)
            await asyncio.sleep(self.config.ingress.capacity_poll_s)

    def admission_stats(self) -> dict[str, Any]:
        """Queue depth per tier, work in flight, outcomes so far, the engines' budget."""
        flight = self.queue.in_flight
        capacity = self.queue.capacity
        return {
            "queued": self.queue.depth(),
            "in_flight": {
                "by_rank": list(flight.prefill_by_rank),
                "requests": flight.requests,
                "prefill_tokens": flight.prefill_tokens,
                "kv_tokens": flight.kv_tokens,
                "seqs": flight.seqs,
            },
            "counts": dict(self.queue.counts),
            "replica_losses": dict(self.service.replica_losses),
            "capacity": None if capacity is None else dataclasses.asdict(capacity),
            "window": self.queue.calendar.window_at(time.time()),
            "open": self.auth.open,
        }


def _handle_route(request: GenerateRequest) -> str:
    if isinstance(request, ResponsesRequest):
        return "handle:responses"
    return "handle:chat" if isinstance(request, ChatCompletionRequest) else "handle:complete"


def _status(exc: BaseException) -> int:
    """The HTTP status a failure maps to; 499 for a client that went away."""
    return to_api_error(exc).status if isinstance(exc, Exception) else 499


async def _once(reply: Any) -> AsyncIterator[Any]:
    yield await reply
