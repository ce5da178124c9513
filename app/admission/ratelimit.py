"""Per-tenant rate limits: token buckets for requests, input tokens and output tokens per
minute (clock injected, no Ray).

A bucket holds up to one minute's allowance and refills continuously. A request takes
1 request, its prompt tokens and its `max_tokens` × n output tokens at once, or nothing:
when any bucket is short, the request is refused with the wait until all three would have
enough (the `Retry-After`). The unused part of the output reservation is given back when
the request ends, and everything when it never ran (queue timeout, cancelled).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from pydantic import Field

from deployments.options import Section


class RateLimits(Section):
    requests_per_min: int | None = Field(default=None, ge=1)
    input_tokens_per_min: int | None = Field(default=None, ge=1)
    output_tokens_per_min: int | None = Field(default=None, ge=1)


@dataclass(slots=True)
class Bucket:
    capacity: float
    level: float
    updated: float

    @property
    def rate(self) -> float:  # per second
        return self.capacity / 60.0

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def wait_s(self, amount: float) -> float:
        """Seconds until the bucket holds `amount` (inf if it never can)."""
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level) / self.rate)

    def reset_s(self) -> float:
        """Seconds until the bucket is full again."""
        return (self.capacity - self.level) / self.rate


@dataclass(frozen=True, slots=True)
class Demand:
    requests: int
    input_tokens: int
    output_tokens: int


class RateLimited(Exception):
    """A tenant is over one of its limits. `retry_after_s` is inf when the request can never
    fit (larger than a whole minute's allowance)."""

    def __init__(self, dimension: str, limit: int, needed: int, retry_after_s: float):
        self.dimension, self.limit, self.needed = dimension, limit, needed
        self.retry_after_s = retry_after_s
        if math.isinf(retry_after_s):
            message = (
                f"request too large: it needs {needed} {dimension} but the limit is "
                f"{limit} {dimension} per minute"
            )
        else:
            message = (
                f"rate limit reached for {dimension}: limit {limit} per minute; "
                f"retry in {retry_after_s:.1f}s"
            )
        super().__init__(message)


DIMENSIONS = ("requests", "input_tokens", "output_tokens")


@dataclass(slots=True)
class TenantBuckets:
    buckets: dict[str, Bucket] = field(default_factory=dict)  # dimension -> bucket


class RateLimiter:
    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.tenants: dict[str, TenantBuckets] = {}

    def _buckets(self, tenant: str, limits: RateLimits, now: float) -> dict[str, Bucket]:
        state = self.tenants.setdefault(tenant, TenantBuckets())
        for dim in DIMENSIONS:
            limit = getattr(limits, f"{dim}_per_min")
            bucket = state.buckets.get(dim)
            if limit is None:
                state.buckets.pop(dim, None)
            elif bucket is None or bucket.capacity != limit:  # new, or the limit changed
                state.buckets[dim] = Bucket(float(limit), float(limit), now)
            else:
                bucket.refill(now)
        return state.buckets

    def take(self, tenant: str, limits: RateLimits, demand: Demand) -> None:
        """Take `demand` from the tenant's buckets, or raise RateLimited taking nothing."""
        now = self.clock()
        buckets = self._buckets(tenant, limits, now)
        worst: RateLimited | None = None
        for dim, bucket in buckets.items():
            needed = getattr(demand, dim)
            wait = bucket.wait_s(needed)
            if wait > 0 and (worst is None or wait > worst.retry_after_s):
                worst = RateLimited(dim, int(bucket.capacity), needed, wait)
        if worst is not None:
            raise worst
        for dim, bucket in buckets.items():
            bucket.level -= getattr(demand, dim)

    def give_back(self, tenant: str, limits: RateLimits, demand: Demand) -> None:
        buckets = self._buckets(tenant, limits, self.clock())
        for dim, bucket in buckets.items():
            bucket.level = min(bucket.capacity, bucket.level + getattr(demand, dim))

    def headers(self, tenant: str, limits: RateLimits) -> dict[str, str]:
        """OpenAI-style `x-ratelimit-*` headers (input tokens are the `tokens` family)."""
        buckets = self._buckets(tenant, limits, self.clock())
        names = {"requests": "requests", "input_tokens": "tokens", "output_tokens": "output-tokens"}
        out: dict[str, str] = {}
        for dim, bucket in buckets.items():
            name = names[dim]
            out[f"x-ratelimit-limit-{name}"] = str(int(bucket.capacity))
            out[f"x-ratelimit-remaining-{name}"] = str(max(0, int(bucket.level)))
            out[f"x-ratelimit-reset-{name}"] = f"{bucket.reset_s():.3f}s"
        return out
