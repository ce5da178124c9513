"""Ingress deployment: the OpenAI-compatible HTTP API and the typed Python handle API.

HTTP routes and handle methods (`chat`, `chat_stream`, `complete`, `complete_stream`,
`models`) both go through one ChatService; the deployments are reached through
ServeBackend (Serve handles, the Scheduler's replica choice carried in each job).
"""

# NOTE: no `from __future__ import annotations` here: FastAPI must see the real `Request`
# annotation on the class-based routes, or it treats `http` as a query parameter.

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle

from app import flow
from app.admission.capacity import Capacity
from app.admission.gate import Caller, Gate
from app.admission.queues import AdmissionQueue
from app.admission.ratelimit import RateLimiter
from app.api.errors import BadRequestError, PermissionDeniedError, to_api_error
from app.api.http import (
    error_response,
    install_error_handlers,
    openapi_with_bodies,
    read_json,
    sse,
)
from app.api.schemas import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    dump,
)
from app.audit import AuditLog, AuditRecord
from app.auth import Authenticator, Tenant
from app.backend import NodeHandles, ServeBackend
from app.config import AppConfig
from app.ledger import BUCKET_WIDTHS, Ledger
from app.observe import observe_outcome
from app.pii import PIIFilter
from app.pricing import PriceBook
from app.roots import RootSpans, current
from app.service import ChatService
from deployments import tracing
from deployments.metrics import Metrics
from engine.config import ModelConfig
from engine.loader import model_fingerprint
from engine.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# NOTE: newer FastAPI opens its own HTTP span per request; ours (app/roots.py, which handle
# calls get too) is the root, so FastAPI's telemetry is off where it exists.
_quiet = {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
api = FastAPI(
    title="dualpath-serve",
    docs_url="/docs",
    redoc_url=None,
    **(_quiet if "telemetry" in inspect.signature(FastAPI).parameters else {}),
)


install_error_handlers(api)


@serve.ingress(api)
class Ingress:
    def __init__(
        self,
        config: AppConfig,
        scheduler: DeploymentHandle,
        nodes: dict[str, NodeHandles],
    ):
        model_dir = config.model.path.expanduser()
        model_config = ModelConfig.from_dir(model_dir)
        engine_config = config.engine.engine_config(config.model, None)
        max_len = engine_config.resolve_max_model_len(model_config)
        self.config, self.scheduler = config, scheduler
        clock = time.time
        self.auth = Authenticator(config.auth)
        prices = PriceBook(config.pricing)
        self.queue = AdmissionQueue(config.admission, prices.calendar, clock)
        ledger_path = config.ingress.ledger_path
        self.ledger = Ledger(ledger_path.expanduser() if ledger_path else None)
        self.audit = AuditLog(config.audit)
        self.gate = Gate(
            self.queue,
            RateLimiter(clock),
            prices,
            self.ledger,
            config.model.name,
            clock,
            audit=self._outcome,
        )
        self.metrics = Metrics("ray")
        limit = config.ingress.max_tokens_limit
        api.openapi = openapi_with_bodies(api, [config.model.name], limit)  # type: ignore[method-assign]
        tracing.setup_tracing(config.tracing, "dualpath.ingress")
        self.roots = RootSpans()
        for handler in logging.getLogger().handlers + logging.getLogger("ray.serve").handlers:
            handler.addFilter(PIIFilter())  # nothing personal reaches a log line
        self._capacity_task: asyncio.Task[None] | None = None
        self.service = ChatService(
            Tokenizer(model_dir),
            flow.ModelInfo(
                config.model.name,
                max_len,
                model_config.vocab_size,
                model_fingerprint(model_dir),
                config.engine.block_size,
                config.kvstore.load_failure,
                config.ingress.max_replica_retries,
            ),
            ServeBackend(scheduler, nodes),
            config.ingress.default_max_tokens,
            self.gate,
            limit,
        )

    # ------------------------------------------------------------------ admission
    def _caller(
        self, tenant: Tenant, service_tier: str | None, route: str, request_id: str
    ) -> Caller:
        self._watch_capacity()
        return Caller(tenant, Gate.tier(tenant, service_tier), route, request_id)

    def _outcome(self, record: AuditRecord, meter: Any) -> None:
        """One request's end: its audit line, its metrics, its root span's attributes."""
        self.audit.write(record)
        observe_outcome(self.metrics, record, meter)
        self.roots.annotate(record)

    def _audit_refusal(
        self, tenant: Tenant | None, route: str, exc: BaseException, request_id: str
    ) -> None:
        """Requests refused before the gate saw them (key, body, tier): one audit line."""
        if getattr(exc, "audited", False) or not isinstance(exc, Exception):
            return
        error = to_api_error(exc)
        self._outcome(
            AuditRecord(
                time=time.time(),
                request_id=request_id,
                tenant=tenant.name if tenant else "unknown",
                model=self.config.model.name,
                route=route,
                status="rejected",
                http_status=error.status,
                error_code=error.code,
            ),
            None,
        )

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
                reports = await self.scheduler.engines.remote()
                reads = await self.scheduler.read_capacity.remote()
                rate = section.default_prefill_tokens_per_s
                prefill_s, read_s = section.prefill_queue_s, section.read_queue_s
                capacity = Capacity.from_reports(reports, prefill_s, rate, reads, read_s)
                self.queue.update_capacity(capacity)
            except Exception:
                logger.warning("engine loads unavailable for admission", exc_info=True)
            await asyncio.sleep(self.config.ingress.capacity_poll_s)

    async def admission_stats(self) -> dict[str, Any]:
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
            # NOTE: through the module: Serve pickles this class by value, globals and all
            "replica_losses": dict(flow.replica_losses),
            "capacity": None if capacity is None else dataclasses.asdict(capacity),
            "window": self.queue.calendar.window_at(time.time()),
            "open": self.auth.open,
        }

    # ------------------------------------------------------------------ Python handle API
    # NOTE: handle callers present the same API key as HTTP callers (`api_key=`), and get
    # the same admission, limits and billing.
    async def chat(
        self, request: ChatCompletionRequest, api_key: str | None = None
    ) -> ChatCompletionResponse:
        return await self._unary_call("handle:chat", api_key, request, self.service.chat)

    async def chat_stream(
        self, request: ChatCompletionRequest, api_key: str | None = None
    ) -> AsyncIterator[ChatCompletionChunk]:
        calls = self._stream_call("handle:chat_stream", api_key, request, self.service.chat_stream)
        async with contextlib.aclosing(calls):  # type: ignore[type-var]
            async for chunk in calls:
                yield chunk

    async def complete(
        self, request: CompletionRequest, api_key: str | None = None
    ) -> CompletionResponse:
        return await self._unary_call("handle:complete", api_key, request, self.service.complete)

    async def complete_stream(
        self, request: CompletionRequest, api_key: str | None = None
    ) -> AsyncIterator[CompletionResponse]:
        calls = self._stream_call(
            "handle:complete_stream", api_key, request, self.service.complete_stream
        )
        async with contextlib.aclosing(calls):  # type: ignore[type-var]
            async for chunk in calls:
                yield chunk

    async def _unary_call(
        self, route: str, api_key: str | None, request: Any, call: Callable[..., Awaitable[Any]]
    ) -> Any:
        rid = self.roots.start(route, route)
        tenant: Tenant | None = None
        try:
            with current(self.roots.span(rid)):
                tenant = self.auth.authenticate(api_key)
                result = await call(request, self._caller(tenant, request.service_tier, route, rid))
        except BaseException as exc:
            self._audit_refusal(tenant, route, exc, rid)
            self.roots.end(
                rid, to_api_error(exc).status if isinstance(exc, Exception) else 499, exc
            )
            raise
        self.roots.end(rid, 200)
        return result

    async def _stream_call(
        self,
        route: str,
        api_key: str | None,
        request: Any,
        call: Callable[..., AsyncIterator[Any]],
    ) -> AsyncIterator[Any]:
        rid = self.roots.start(route, route)
        tenant: Tenant | None = None
        status, error = 200, None
        first = None
        try:
            with current(self.roots.span(rid)):  # never held across a yield
                tenant = self.auth.authenticate(api_key)
                stream = call(request, self._caller(tenant, request.service_tier, route, rid))
                first = await anext(stream, None)
            async with contextlib.aclosing(stream):  # type: ignore[type-var]
                if first is not None:
                    yield first
                async for chunk in stream:
                    yield chunk
        except BaseException as exc:
            self._audit_refusal(tenant, route, exc, rid)  # unless the gate wrote its line
            status = to_api_error(exc).status if isinstance(exc, Exception) else 499
            error = exc
            raise
        finally:
            self.roots.end(rid, status, error)

    async def models(self, api_key: str | None = None) -> ModelList:
        self.auth.authenticate(api_key)
        info = self.service.model
        return ModelList(data=[ModelCard(id=info.name, max_model_len=info.max_model_len)])

    # ------------------------------------------------------------------ HTTP
    @api.get("/health")
    async def health(self) -> Response:
        engines = await self.scheduler.engines.remote()
        roles = {e.role for e in engines}
        status = 200 if {"prefill", "decode"} <= roles else 503
        return JSONResponse(
            {"status": "ok" if status == 200 else "starting", "engines": len(engines)},
            status_code=status,
        )

    @api.get("/v1/models")
    async def list_models(self, http: Request) -> Response:
        try:
            return JSONResponse(dump(await self.models(http.headers.get("authorization"))))
        except Exception as exc:
            return error_response(exc)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, http: Request) -> Response:
        return await self._generate(
            http, ChatCompletionRequest, self.service.chat, self.service.chat_stream
        )

    @api.post("/v1/completions")
    async def completions(self, http: Request) -> Response:
        return await self._generate(
            http, CompletionRequest, self.service.complete, self.service.complete_stream
        )

    async def _generate(
        self,
        http: Request,
        schema: type[ChatCompletionRequest] | type[CompletionRequest],
        unary: Callable[..., Awaitable[BaseModel]],
        streaming: Callable[..., AsyncIterator[BaseModel]],
    ) -> Response:
        """Key → body → tier → admission → JSON, or SSE once the first chunk exists (errors
        before any token become a status code). Known tenants get `x-ratelimit-*` headers
        on every answer, refusals included."""
        tenant: Tenant | None = None
        route = http.url.path
        rid = self.roots.start(f"POST {route}", route, http.headers)
        try:
            with current(self.roots.span(rid)):
                tenant = self.auth.authenticate(http.headers.get("authorization"))
                body = await read_json(http, self.config.ingress.max_body_bytes)
                request = schema.model_validate(body)
                caller = self._caller(tenant, request.service_tier, route, rid)
                if not request.stream:
                    response = await unary(request, caller)
                    self.roots.end(rid, 200)
                    return JSONResponse(dump(response), headers=self.gate.headers(tenant))
                stream = streaming(request, caller)
                first = await anext(stream)
        except Exception as exc:
            self._audit_refusal(tenant, route, exc, rid)
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

    @api.get("/v1/usage")
    async def usage(self, http: Request) -> Response:
        """The caller's usage and cost in time buckets (OpenAI usage-API shape). Admins may
        name any `tenant` or, naming none, see everyone's."""
        try:
            tenant = self.auth.authenticate(http.headers.get("authorization"))
            query = http.query_params
            now = int(time.time())
            try:
                end = int(query.get("end_time", now))
                start = int(query.get("start_time", end - 7 * 86400))
            except ValueError:
                raise BadRequestError("start_time and end_time are unix seconds") from None
            width = query.get("bucket_width", "1d")
            if width not in BUCKET_WIDTHS:
                raise BadRequestError("bucket_width is one of 1m, 1h, 1d", param="bucket_width")
            who = query.get("tenant")
            if self.auth.open or tenant.config.admin:
                scope = who
            elif who not in (None, tenant.name):
                raise PermissionDeniedError("only admin keys may read other tenants' usage")
            else:
                scope = tenant.name
            try:
                data = self.ledger.buckets(start, end, BUCKET_WIDTHS[width], tenant=scope)
            except ValueError as exc:
                raise BadRequestError(str(exc)) from None
            return JSONResponse({"object": "page", "data": data, "has_more": False})
        except Exception as exc:
            return error_response(exc)
