"""The ingress's admission gate: tier → tenant limits → queue → lease → bill. No Ray.

    async with gate.enter(tenant, tier, ticket) as lease:   # 403 / 429 / 503 / 408 here
        ... run the request; lease.prefill_done() at its first token ...
        lease.meter = tally                                   # what it used, for the bill
    # on exit: capacity and unused rate-limit tokens are given back; one ledger line

`enter` refuses before queueing when the tenant is over a rate limit (429 with the wait
until its buckets refill) or over its concurrency (429); the queue itself answers 503
(tier queue full), 408 (queue timeout) and 429 (flex deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from app.admission.queues import AdmissionQueue, Lease, Ticket
from app.admission.ratelimit import Demand, RateLimited, RateLimiter
from app.api.errors import PermissionDeniedError, RateLimitError
from app.auth import Tenant, Tier
from app.ledger import Ledger, UsageRecord
from app.pricing import Charge, PriceBook


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request and the tier it runs in."""

    tenant: Tenant
    tier: Tier


class Gate:
    def __init__(
        self,
        queue: AdmissionQueue,
        limiter: RateLimiter,
        prices: PriceBook,
        ledger: Ledger,
        model: str,
        clock: Callable[[], float],
    ):
        self.queue, self.limiter, self.prices, self.ledger = queue, limiter, prices, ledger
        self.model = model
        self.clock = clock
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
    async def enter(self, tenant: Tenant, ticket: Ticket) -> AsyncIterator[Lease]:
        config = tenant.config
        ticket.weight = config.weight
        running = self.running.get(tenant.name, 0)
        if config.max_concurrent is not None and running >= config.max_concurrent:
            raise RateLimitError(
                f"too many concurrent requests: the limit is {config.max_concurrent}",
                code="concurrency_limit",
                headers={"Retry-After": "1"} | self.headers(tenant),
            )
        demand = Demand(1, ticket.prompt_tokens, ticket.max_tokens * ticket.n)
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
        self.running[tenant.name] = running + 1
        lease: Lease | None = None
        try:
            lease = await self.queue.admit(ticket)
            status = "error"
            try:
                yield lease
                status = "ok"
            except (asyncio.CancelledError, GeneratorExit):
                status = "cancelled"
                raise
            finally:
                lease.release()
                hit, miss, out = lease.meter.counts() if lease.meter else (0, 0, 0)
                unused = max(0, ticket.max_tokens * ticket.n - out)
                self.limiter.give_back(tenant.name, config.limits, Demand(0, 0, unused))
                self._record(tenant, lease, status, hit, miss, out)
        finally:
            self.running[tenant.name] -= 1
            if lease is None:  # never ran: the whole reservation goes back
                self.limiter.give_back(tenant.name, config.limits, demand)

    def charge(self, lease: Lease, hit: int, miss: int, out: int) -> Charge:
        return self.prices.charge(self.model, lease.tier, lease.window, hit, miss, out)

    def _record(
        self, tenant: Tenant, lease: Lease, status: str, hit: int, miss: int, out: int
    ) -> None:
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
