"""Tenants, rate limits and billing around the admission queue (no Ray, injected clock)."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from app.admission.gate import Gate
from app.admission.queues import AdmissionQueue, QueueSection, Ticket
from app.admission.ratelimit import Demand, RateLimited, RateLimiter, RateLimits
from app.api.errors import AuthenticationError, PermissionDeniedError, RateLimitError
from app.auth import ANONYMOUS, Authenticator, AuthSection, TenantSection, hash_key
from app.ledger import Ledger
from app.pricing import ModelPrice, PriceBook, PricingSection

pytestmark = pytest.mark.anyio

# 2026-11-23 is a Monday; 10:00 in Shanghai (UTC+8) is peak
MONDAY_10_SHANGHAI = 1795399200.0


class Clock:
    def __init__(self, t: float = MONDAY_10_SHANGHAI):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Meter:
    def __init__(self, hit: int, miss: int, out: int):
        self.values = (hit, miss, out)

    def counts(self) -> tuple[int, int, int]:
        return self.values


def tenant(name: str = "acme", **config):
    config.setdefault("key_sha256", [hash_key(f"sk-{name}")])
    auth = Authenticator(AuthSection(tenants=[TenantSection(name=name, **config)]), environ={})
    return auth.tenants[name]


def make_gate(clock: Clock, tmp_path) -> Gate:
    prices = PriceBook(
        PricingSection(default=ModelPrice(input_cache_hit=0.1, input_cache_miss=1.0, output=2.0))
    )
    queue = AdmissionQueue(QueueSection(), prices.calendar, clock, tick_s=3600)
    return Gate(queue, RateLimiter(clock), prices, Ledger(tmp_path / "usage.jsonl"), "m", clock)


def test_clock_constant_is_monday_peak_in_shanghai():
    prices = PriceBook(PricingSection())
    assert prices.calendar.window_at(MONDAY_10_SHANGHAI) == "peak"


# ---------------------------------------------------------------------------- auth
def test_keys_are_kept_hashed_and_checked():
    auth = Authenticator(
        AuthSection(tenants=[TenantSection(name="acme", key_sha256=[hash_key("sk-acme")])]),
        environ={"DUALPATH_API_KEYS": "beta:sk-beta, gamma:sk-g"},
    )
    assert not auth.open
    assert auth.authenticate("Bearer sk-acme").name == "acme"
    assert auth.authenticate("bearer sk-beta").name == "beta"
    assert auth.authenticate("sk-g").name == "gamma"  # the handle API passes the bare key
    for bad in (None, "", "Bearer ", "Bearer sk-acme2", "Basic sk-acme"):
        with pytest.raises(AuthenticationError) as err:
            auth.authenticate(bad)
        assert err.value.status == 401
    stored = {d for t in auth.tenants.values() for d in t.config.key_sha256}
    assert "sk-beta" not in json.dumps(sorted(stored))
    assert hashlib.sha256(b"sk-beta").hexdigest() in stored


def test_keys_file_and_open_mode(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(
        "tenants:\n  - name: filed\n"
        f"    key_sha256: ['{hash_key('sk-file')}']\n    limits: {{requests_per_min: 5}}\n"
    )
    auth = Authenticator(AuthSection(keys_file=path), environ={})
    assert auth.authenticate("Bearer sk-file").config.limits.requests_per_min == 5
    open_auth = Authenticator(AuthSection(), environ={})
    assert open_auth.open and open_auth.authenticate(None).name == ANONYMOUS
    assert open_auth.authenticate(None).salt == b""
    # fail closed: a keys file (or tenant list) that yields no key never opens the API
    path.write_text("tenants: []\n")
    with pytest.raises(ValueError, match="refusing to run open"):
        Authenticator(AuthSection(keys_file=path), environ={})
    with pytest.raises(ValueError, match="refusing to run open"):
        Authenticator(AuthSection(tenants=[TenantSection(name="nokey")]), environ={})
    with pytest.raises(FileNotFoundError):
        Authenticator(AuthSection(keys_file=tmp_path / "missing.yaml"), environ={})


def test_tenants_get_their_own_kv_salt_unless_they_share_a_group():
    a, b = tenant("a"), tenant("b")
    assert a.salt != b.salt and len(a.salt) == 16
    assert tenant("a", cache_group="team").salt == tenant("b", cache_group="team").salt


def test_bad_key_config_is_refused():
    with pytest.raises(ValueError):
        TenantSection(name="x", key_sha256=["not-a-digest"])
    with pytest.raises(ValueError):
        Authenticator(AuthSection(), environ={"DUALPATH_API_KEYS": "no-colon"})


# ---------------------------------------------------------------------------- rate limits
def test_token_bucket_retry_after_is_the_refill_time():
    clock = Clock(0.0)
    limiter = RateLimiter(clock)
    limits = RateLimits(requests_per_min=60, input_tokens_per_min=6000)
    for _ in range(3):
        limiter.take("t", limits, Demand(1, 1500, 0))
    with pytest.raises(RateLimited) as err:  # 1500 left, 2500 wanted at 100 tokens/s
        limiter.take("t", limits, Demand(1, 2500, 0))
    assert err.value.dimension == "input_tokens"
    assert err.value.retry_after_s == pytest.approx(10.0)
    clock.t = 9.9
    with pytest.raises(RateLimited):
        limiter.take("t", limits, Demand(1, 2500, 0))
    clock.t = 10.0
    limiter.take("t", limits, Demand(1, 2500, 0))
    with pytest.raises(RateLimited) as err:
        limiter.take("t", limits, Demand(1, 7000, 0))
    assert err.value.retry_after_s == float("inf")  # larger than a minute's allowance


async def test_over_limit_tenant_gets_429_with_retry_after_and_headers(tmp_path):
    clock = Clock()
    gate = make_gate(clock, tmp_path)
    acme = tenant(limits=RateLimits(requests_per_min=2, output_tokens_per_min=600))
    for _ in range(2):
        async with gate.enter(acme, Ticket("r", "acme", "default", 10, 100), Meter(0, 10, 100)):
            pass
    with pytest.raises(RateLimitError) as err:
        async with gate.enter(acme, Ticket("r", "acme", "default", 10, 100)):
            pass
    # 2 requests per minute: one request comes back after 30 s
    assert err.value.status == 429 and err.value.code == "rate_limit_exceeded"
    assert err.value.headers["Retry-After"] == "30"
    assert err.value.headers["x-ratelimit-limit-requests"] == "2"
    assert err.value.headers["x-ratelimit-remaining-requests"] == "0"
    clock.t += 30
    async with gate.enter(acme, Ticket("r", "acme", "default", 10, 100)):
        pass
    other = tenant("other", limits=RateLimits(requests_per_min=2))
    async with gate.enter(other, Ticket("r", "other", "default", 10, 100)):
        pass  # limits are per tenant


async def test_unused_output_reservation_is_given_back(tmp_path):
    gate = make_gate(Clock(), tmp_path)
    acme = tenant(limits=RateLimits(output_tokens_per_min=1000))
    stopped_early = Meter(0, 10, 50)  # 50 of 900 output tokens: 850 unused
    async with gate.enter(acme, Ticket("r", "acme", "default", 10, 900), stopped_early):
        assert gate.headers(acme)["x-ratelimit-remaining-output-tokens"] == "100"
    assert gate.headers(acme)["x-ratelimit-remaining-output-tokens"] == "950"


async def test_concurrency_limit_and_tier_permissions(tmp_path):
    gate = make_gate(Clock(), tmp_path)
    acme = tenant(max_concurrent=1, tiers=["default", "flex"])
    assert Gate.tier(acme, None) == "default" and Gate.tier(acme, "auto") == "default"
    with pytest.raises(PermissionDeniedError) as err:
        Gate.tier(acme, "priority")
    assert err.value.status == 403 and err.value.param == "service_tier"
    async with gate.enter(acme, Ticket("r", "acme", "default", 10, 10)):
        with pytest.raises(RateLimitError) as err:
            async with gate.enter(acme, Ticket("r2", "acme", "default", 10, 10)):
                pass
        assert err.value.code == "concurrency_limit" and err.value.headers["Retry-After"]
    async with gate.enter(acme, Ticket("r3", "acme", "default", 10, 10)):
        pass


async def test_ledger_lines_for_success_error_and_cancel(tmp_path):
    clock = Clock()
    gate = make_gate(clock, tmp_path)
    acme = tenant()
    async with gate.enter(
        acme, Ticket("ok", "acme", "priority", 3000, 500), Meter(2000, 1000, 500)
    ) as lease:
        charge = gate.charge(lease, 2000, 1000, 500)
    with pytest.raises(RuntimeError):
        async with gate.enter(
            acme, Ticket("bad", "acme", "default", 10, 10), Meter(0, 10, 0)
        ) as lease:
            raise RuntimeError("engine died")

    entered = asyncio.Event()

    async def cancelled() -> None:
        async with gate.enter(acme, Ticket("gone", "acme", "default", 10, 10), Meter(0, 10, 3)):
            entered.set()
            await asyncio.Event().wait()  # the engine never answers: runs until cancelled

    task = asyncio.ensure_future(cancelled())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    lines = [json.loads(x) for x in (tmp_path / "usage.jsonl").read_text().splitlines()]
    assert [(x["request_id"], x["status"]) for x in lines] == [
        ("ok", "ok"),
        ("bad", "error"),
        ("gone", "cancelled"),
    ]
    ok = lines[0]
    # peak (x2): (2000 x 0.1 + 1000 x 1.0 + 500 x 2.0) / 1e6 x 2
    assert ok["cost"] == pytest.approx(0.0044) == charge.amount
    assert (ok["window"], ok["service_tier"], ok["tenant"]) == ("peak", "priority", "acme")
    assert lines[2]["output_tokens"] == 3
    assert gate.queue.in_flight.requests == 0 and gate.running["acme"] == 0


async def test_every_outcome_gets_one_audit_record(tmp_path):
    records = []
    gate = make_gate(Clock(), tmp_path)
    gate.audit = lambda record, meter: records.append(record)
    acme = tenant(limits=RateLimits(requests_per_min=2))
    ok = Ticket("ok", "acme", "default", 30, 5, route="/v1/completions", user="bob@example.com")
    async with gate.enter(acme, ok, Meter(10, 20, 5)):
        pass
    with pytest.raises(RuntimeError):
        async with gate.enter(acme, Ticket("bad", "acme", "default", 10, 10)):
            raise RuntimeError("engine died")
    with pytest.raises(RateLimitError):
        async with gate.enter(acme, Ticket("over", "acme", "default", 10, 10)):
            pass
    got = [(r.request_id, r.status, r.http_status, r.error_code) for r in records]
    assert got == [
        ("ok", "ok", 200, None),
        ("bad", "error", 500, "internal_error"),
        ("over", "rejected", 429, "rate_limit_exceeded"),
    ]
    first = records[0]
    assert (first.prompt_tokens, first.cached_tokens, first.completion_tokens) == (30, 10, 5)
    assert first.cost > 0 and first.window == "peak" and first.route == "/v1/completions"
    assert first.user == "bob@example.com"  # masked by AuditLog when written


async def test_admission_is_a_span_ending_at_admission_and_refusals_are_errors(tmp_path, spans):
    gate = make_gate(Clock(), tmp_path)
    acme = tenant(max_concurrent=1)
    async with gate.enter(acme, Ticket("r1", "acme", "priority", 10, 10)):
        (admitted,) = spans.get_finished_spans()  # ended before the request's body ran
        with pytest.raises(RateLimitError):
            async with gate.enter(acme, Ticket("r2", "acme", "default", 10, 10)):
                pass
    first, refused = spans.get_finished_spans()
    assert first is admitted and first.name == refused.name == "admission"
    assert first.attributes["tier"] == "priority" and first.attributes["tenant"] == "acme"
    assert first.attributes["queued_ms"] >= 0 and first.status.is_ok
    assert not refused.status.is_ok and refused.events[0].name == "exception"
