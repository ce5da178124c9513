"""The ingress's admission gate: tier → tenant limits → queue → lease → bill. No Ray.

    async with gate.enter(tenant, ticket, meter) as lease:   # 403 / 429 / 503 / 408 here
        ... run the request; lease.prefill_done() at its first token; the meter counts ...
    # on exit: capacity and unused rate-limit tokens are given back; one ledger line
    gate.refuse(request_id, route, tenant, exc)          # refused before it reached `enter`

`enter` refuses before queueing when the tenant is over a rate limit (429 with the wait
until its buckets refill) or over its concurrency (429); the queue itself answers 503
(tier queue full), 408 (queue timeout) and 429 (flex deadline).

The Gate is the one auditor: every request gets exactly one audit record, from `enter`
(admitted or refused there) or from `refuse` (refused before: key, body, tier, prompt).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol

from app.admission.queues import AdmissionQueue, Lease, Ticket
from app.admission.ratelimit import Demand, RateLimited, RateLimiter
from app.api.errors import APIError, PermissionDeniedError, RateLimitError, to_api_error
from app.audit import AuditRecord
from app.auth import Tenant, Tier
from app.ledger import Ledger, UsageRecord
from app.pricing import Charge, PriceBook
from deployments import tracing


class Meter(Protocol):
    """What a request used and how long it took (app.request_meter.RequestMeter)."""

    def counts(self) -> tuple[int, int, int]: ...  # (hit, miss, output) tokens

    def spec_counts(self) -> tuple[int, int, int]: ...  # (drafted, accepted, verify steps)

    @property
    def ttft_s(self) -> float | None: ...

    @property
    def tpot_s(self) -> float | None: ...


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request and the tier it runs in."""

    tenant: Tenant
    tier: Tier
    route: str = ""  # for the audit log: "/v1/chat/completions", "handle:chat", ...
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # audit, trace, ids


class Gate:
    def __init__(
        self,
        queue: AdmissionQueue,
        limiter: RateLimiter,
        prices: PriceBook,
        ledger: Ledger,
        model: str,
        clock: Callable[[], float],
        audit: Callable[[AuditRecord, Meter | None], None] | None = None,
    ):
        self.queue, self.limiter, self.prices, self.ledger = queue, limiter, prices, ledger
        self.model = model
        self.clock = clock
        self.audit = audit  # one record per outcome (refusals too), with what it measured
        self.running: dict[str, int] = {}  # tenant -> queued + running

    @staticmethod
    def tier(tenant: Tenant, requested: str | None) -> Tier:
        """`auto`/unset → `default`; a tier the tenant may not use → 403."""
        auto = requested in (None, "auto")
        tier: Tier = "default" if auto else requested  # type: ignore[assignment]
        if tier not in tenant.config.tiers:
            raise PermissionDeniedError(
                f"service_tier {tier!r} is not enabled for this API key "
                f"(allowed: {', '.join(tenant.config.tiers)})",
                param="service_tier",
                code="service_tier_not_allowed",
            )
        return tier

    def headers(self, tenant: Tenant) -> dict[str, str]:
        return self.limiter.headers(tenant.name, tenant.config.limits)

    @contextlib.asynccontextmanager
    async def enter(
        self, tenant: Tenant, ticket: Ticket, meter: Meter | None = None
    ) -> AsyncIterator[Lease]:
        """Admit `ticket` for the body's duration; every outcome gets one audit record
        (refusals too) and every admitted request one ledger line, billed by `meter`."""
        config = tenant.config
        ticket.weight = config.weight
        ticket.arrival = self.clock()
        demand = Demand(1, ticket.prompt_tokens, ticket.max_tokens * ticket.n)
        # NOTE: the span ends at admission; it is never current across the body's yields
        span = tracing.start_span("admission", None, tier=ticket.tier, tenant=tenant.name)
        try:
            self._take(tenant, demand)
        except APIError as exc:
            self._audit(tenant, ticket, None, None, "rejected", exc)
            tracing.fail(span, exc)
            span.end()
            raise
        self.running[tenant.name] = self.running.get(tenant.name, 0) + 1
        lease: Lease | None = None
        try:
            try:
                lease = await self.queue.admit(ticket)
            except BaseException as exc:
                cancelled = isinstance(exc, asyncio.CancelledError)
                status = "cancelled" if cancelled else "rejected"
                self._audit(tenant, ticket, None, None, status, exc)
                tracing.fail(span, exc)
                span.end()
                raise
            span.set_attribute("queued_ms", round(lease.queued_s * 1000, 3))
            span.end()
            status, error = "error", None
            try:
                yield lease
                status = "ok"
            except (asyncio.CancelledError, GeneratorExit):
                status = "cancelled"
                raise
            except BaseException as exc:
                error = exc
                raise
            finally:
                lease.release()
                hit, miss, out = meter.counts() if meter else (0, 0, 0)
                unused = max(0, ticket.max_tokens * ticket.n - out)
                self.limiter.give_back(tenant.name, config.limits, Demand(0, 0, unused))
                charge = self._record(tenant, lease, status, hit, miss, out)
                self._audit(tenant, ticket, lease, meter, status, error, (hit, miss, out), charge)
        finally:
            self.running[tenant.name] -= 1
            if lease is None:  # never ran: the whole reservation goes back
                self.limiter.give_back(tenant.name, config.limits, demand)

    def _take(self, tenant: Tenant, demand: Demand) -> None:
        """The tenant's concurrency and rate limits, or RateLimitError taking nothing."""
        config = tenant.config
        running = self.running.get(tenant.name, 0)
        if config.max_concurrent is not None and running >= config.max_concurrent:
            raise RateLimitError(
                f"too many concurrent requests: the limit is {config.max_concurrent}",
                code="concurrency_limit",
                headers={"Retry-After": "1"} | self.headers(tenant),
            )
        try:
            self.limiter.take(tenant.name, config.limits, demand)
        except RateLimited as exc:
            retry = 60 if math.isinf(exc.retry_after_s) else max(1, math.ceil(exc.retry_after_s))
            too_large = math.isinf(exc.retry_after_s)
            raise RateLimitError(
                str(exc),
                code="request_too_large" if too_large else "rate_limit_exceeded",
                headers={"Retry-After": str(retry)} | self.headers(tenant),
            ) from None

    def _audit(
        self,
        tenant: Tenant,
        ticket: Ticket,
        lease: Lease | None,
        meter: Meter | None,
        status: str,
        error: BaseException | None,
        counts: tuple[int, int, int] = (0, 0, 0),
        charge: Charge | None = None,
    ) -> None:
        if self.audit is None:
            return
        api = to_api_error(error) if isinstance(error, Exception) else None
        http = {"ok": 200, "cancelled": 499}.get(status, api.status if api else 500)
        hit, miss, out = counts
        self.audit(
            AuditRecord(
                time=self.clock(),
                request_id=ticket.request_id,
                tenant=tenant.name,
                model=self.model,
                route=ticket.route,
                status=status,
                http_status=http,
                service_tier=ticket.tier,
                window=lease.window if lease else None,
                prompt_tokens=hit + miss if lease else ticket.prompt_tokens,
                cached_tokens=hit,
                completion_tokens=out,
                cost=charge.amount if charge else 0.0,
                currency=charge.currency if charge else self.prices.section.currency,
                error_code=api.code if api else None,
                latency_ms=(self.clock() - ticket.arrival) * 1e3,
                user=ticket.user,
            ),
            meter if lease else None,
        )

    def refuse(
        self, request_id: str, route: str, tenant: Tenant | None, error: BaseException
    ) -> None:
        """The audit record of a request refused before it reached `enter`: a bad key,
        body, tier or prompt. A cancellation (the client left) is not a refusal."""
        if self.audit is None or not isinstance(error, Exception):
            return
        api = to_api_error(error)
        who = tenant.name if tenant else "unknown"
        when = self.clock()
        record = AuditRecord(when, request_id, who, self.model, route, "rejected", api.status)
        self.audit(dataclasses.replace(record, error_code=api.code), None)

    def charge(self, lease: Lease, hit: int, miss: int, out: int) -> Charge:
        return self.prices.charge(self.model, lease.tier, lease.window, hit, miss, out)

    def _record(
        self, tenant: Tenant, lease: Lease, status: str, hit: int, miss: int, out: int
    ) -> Charge:
        charge = self.charge(lease, hit, miss, out)
        self.ledger.record(
            UsageRecord(
                time=self.clock(),
                request_id=lease.ticket.request_id,
                tenant=tenant.name,
                model=self.model,
                service_tier=lease.tier,
                window=lease.window,
                status=status,
                input_cache_hit_tokens=hit,
                input_cache_miss_tokens=miss,
                output_tokens=out,
                cost=charge.amount,
                currency=charge.currency,
            )
        )
        return charge
