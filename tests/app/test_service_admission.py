"""ChatService with the admission gate, over a gated engine pair: each request's prefill
waits until the test opens its gate, so the order requests reach the PE is exact."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from app.admission.capacity import Capacity
from app.admission.gate import Caller, Gate
from app.admission.queues import AdmissionQueue, QueueSection
from app.admission.ratelimit import RateLimited, RateLimiter
from app.api.errors import RateLimitError
from app.api.schemas import CompletionRequest
from app.auth import Authenticator, AuthSection, TenantSection, hash_key
from app.choice_flow import ModelInfo
from app.ledger import Ledger
from app.pricing import PriceBook, PricingSection
from app.service import ChatService
from deployments.protocol import Plan, PlanRequest, PrefillJob, StoredPrefix
from engine.output import RequestOutput
from engine.tokenizer import Tokenizer
from tests.helpers import wait_for

pytestmark = pytest.mark.anyio


class GatedEngines:
    """A PE that answers a prompt with one token when its gate opens (max_tokens=1: the
    request finishes on the PE, no decode)."""

    def __init__(self):
        self.arrived: list[PrefillJob] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.stored = StoredPrefix()  # what the cluster index holds of every prompt
        self.released: list[str] = []  # plans dropped before the DE took them
        self.lost_replicas: list[str] = []  # replicas reported lost to the Scheduler

    async def plan(self, request: PlanRequest) -> Plan:
        return Plan(request.request_id, "pe", "de", "n0", "n0")

    def release(self, request_id: str) -> None:
        self.released.append(request_id)

    async def replace_decode(self, request_id: str, lost_replica: str, num_tokens: int):
        return None  # one decode engine: the moved choice stays on its node

    async def lost(self, replica_id: str) -> None:
        self.lost_replicas.append(replica_id)

    async def lookup(self, block_keys) -> StoredPrefix:
        return self.stored

    async def load(self, node: str, keys, request_id: str = "", dram_only: bool = False) -> list:
        return []

    async def prefill(self, node: str, job: PrefillJob) -> AsyncIterator[RequestOutput]:
        self.arrived.append(job)
        gate = self.gates.setdefault(job.request_id, asyncio.Event())
        await gate.wait()
        n = len(job.prompt_token_ids)
        yield RequestOutput(job.request_id, [7], "x", True, "length", n, 0, 1)

    def decode(self, node, job):  # pragma: no cover - every request ends on the PE
        raise AssertionError("no decode expected")

    async def open_next(self) -> None:
        """Let the oldest unfinished prefill finish."""
        for job in self.arrived:
            gate = self.gates.setdefault(job.request_id, asyncio.Event())
            if not gate.is_set():
                gate.set()
                break
        for _ in range(10):
            await asyncio.sleep(0)


@pytest.fixture
def setup(tiny_model_dir, tmp_path):
    engines = GatedEngines()
    prices = PriceBook(PricingSection(windows={"rules": []}))  # always "normal"
    queue = AdmissionQueue(QueueSection(), prices.calendar, lambda: 1e9, tick_s=3600)
    ledger = Ledger(tmp_path / "usage.jsonl")
    gate = Gate(queue, RateLimiter(lambda: 1e9), prices, ledger, "m", lambda: 1e9)
    tokenizer = Tokenizer(tiny_model_dir)
    service = ChatService(tokenizer, ModelInfo("m", 2048, 49152), engines, 16, gate=gate)
    tenants = [TenantSection(name=n, key_sha256=[hash_key(f"sk-{n}")]) for n in ("a", "b")]
    auth = Authenticator(AuthSection(tenants=tenants), environ={})
    return service, engines, auth, tmp_path / "usage.jsonl"


async def test_requests_reach_the_engine_in_tier_order_and_are_billed(setup):
    service, engines, auth, ledger_path = setup

    def request(tier: str) -> CompletionRequest:
        return CompletionRequest(model="m", prompt=[1, 2, 3, 4], max_tokens=1, service_tier=tier)

    def call(tenant: str, tier: str) -> asyncio.Task:
        caller = Caller(auth.tenants[tenant], Gate.tier(auth.tenants[tenant], tier))
        return asyncio.ensure_future(service.complete(request(tier), caller))

    first = call("a", "default")
    await wait_for(lambda: len(engines.arrived) == 1, "the first request reaches the PE")
    tasks = [call("b", "flex"), call("a", "default"), call("b", "priority")]
    queue = service.gate.queue
    await wait_for(lambda: sum(queue.depth().values()) == 3, "three requests wait in the gate")
    assert len(engines.arrived) == 1  # one in flight: the rest wait in the gate
    for _ in range(4):
        await engines.open_next()
    replies = await asyncio.gather(first, *tasks)
    assert [job.priority for job in engines.arrived] == [1, 0, 1, 2]  # PE gets the tier rank
    assert [r.service_tier for r in replies] == ["default", "flex", "default", "priority"]
    for reply in replies:
        assert reply.usage.cost.window == "normal" and reply.usage.cost.amount > 0
    lines = [json.loads(x) for x in ledger_path.read_text().splitlines()]
    assert [x["service_tier"] for x in lines] == ["default", "priority", "default", "flex"]
    assert all(x["status"] == "ok" and x["output_tokens"] == 1 for x in lines)
    assert service.gate.queue.in_flight.requests == 0


async def test_each_outcome_becomes_metrics(setup):
    from app.outcome_metrics import observe_outcome
    from deployments.metrics import Metrics

    service, engines, auth, _ = setup
    metrics = Metrics("memory")
    service.gate.audit = lambda record, meter: observe_outcome(metrics, record, meter)
    caller = Caller(auth.tenants["a"], "priority", "/v1/completions")
    req = CompletionRequest(model="m", prompt=[1, 2, 3, 4, 5], max_tokens=1)
    task = asyncio.ensure_future(service.complete(req, caller))
    await wait_for(lambda: len(engines.arrived) == 1, "the request reaches the PE")
    await engines.open_next()
    await task
    assert metrics.value("dualpath_requests_total", service_tier="priority", status="ok") == 1
    assert metrics.value("dualpath_prompt_tokens_total") == 5
    assert metrics.value("dualpath_cost_total", service_tier="priority", window="normal") > 0
    (ttft,) = metrics.samples[("dualpath_ttft_seconds", (("service_tier", "priority"),))]
    assert 0 < ttft < 5
    service.gate.limiter.take = _refuse  # the tenant is over its limit now
    with pytest.raises(RateLimitError):
        await service.complete(req, caller)
    reason = {"reason": "rate_limit_exceeded", "service_tier": "priority"}
    assert metrics.value("dualpath_admission_rejections_total", **reason) == 1


def _refuse(*args):
    raise RateLimited("requests", 1, 1, 12.0)


async def test_a_disconnected_waiter_never_reaches_the_engine(setup):
    service, engines, auth, ledger_path = setup
    caller = Caller(auth.tenants["a"], "default")
    req = CompletionRequest(model="m", prompt=[1, 2, 3], max_tokens=1)
    running = asyncio.ensure_future(service.complete(req, caller))
    await wait_for(lambda: len(engines.arrived) == 1, "the first request reaches the PE")
    waiting = asyncio.ensure_future(service.complete(req, caller))
    depth = service.gate.queue.depth
    await wait_for(lambda: depth()["default"] == 1, "the second request waits in the queue")
    waiting.cancel()  # what Serve does when the HTTP client goes away
    await wait_for(lambda: depth()["default"] == 0, "the cancelled waiter leaves the queue")
    await engines.open_next()
    await running
    assert len(engines.arrived) == 1
    assert service.gate.running["a"] == 0


async def test_turns_whose_prompt_is_stored_are_admitted_together(setup):
    """The service asks the cluster index what each prompt has stored and admission charges
    only the miss tokens to the PE: three 640-token turns with 576 tokens stored run at once
    under a 200-token prefill budget; three cold ones run one at a time."""
    service, engines, auth, _ = setup
    queue = service.gate.queue
    queue.update_capacity(Capacity(prefill_tokens=200, kv_tokens=1e6, seqs=64, read_bytes=1e9))

    def turns(first: int) -> list[asyncio.Task]:
        prompts = [list(range(first + i, first + i + 640)) for i in range(3)]
        requests = [CompletionRequest(model="m", prompt=p, max_tokens=1) for p in prompts]
        return [
            asyncio.ensure_future(service.complete(r, Caller(auth.tenants["a"], "priority")))
            for r in requests
        ]

    engines.stored = StoredPrefix(num_blocks=9, num_snic_blocks=9, block_bytes=1000)
    warm = turns(1)
    await wait_for(lambda: len(engines.arrived) == 3, "all three warm turns reach the PE")
    assert queue.in_flight.prefill_tokens == 3 * 64
    assert queue.in_flight.read_bytes == 0  # reads ended (the flow's on_loaded), prefill not
    for _ in warm:
        await engines.open_next()
    await asyncio.gather(*warm)

    engines.stored = StoredPrefix()  # nothing stored: the whole prompt is prefill work
    cold = turns(5000)
    await wait_for(
        lambda: len(engines.arrived) == 4 and queue.depth()["priority"] == 2,
        "one cold turn reaches the PE and two wait",
    )
    assert len(engines.arrived) == 4  # one cold turn at a time
    for i in range(len(cold)):  # each is admitted when the one before it ends
        await wait_for(lambda i=i: len(engines.arrived) == 4 + i, f"cold turn {i} is admitted")
        await engines.open_next()
    await asyncio.gather(*cold)
    assert (queue.in_flight.requests, queue.in_flight.read_bytes) == (0, 0)
    # each ended at its first token, never reaching a DE: its plan is released at once
    assert sorted(engines.released) == sorted(job.request_id for job in engines.arrived)
