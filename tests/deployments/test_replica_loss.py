"""A replica lost mid-request (reliability-tests C1/C2), in one process: the backend raises
`ReplicaLost` where Ray would raise an actor error, and the lost side's request really ends
on its engine. Before the first token the choice is planned again; after it, the DE's part
moves and the new DE recomputes prompt + streamed tokens, so greedy and seeded output are
token-identical to one engine, nothing is streamed twice and no KV block leaks. The same
with Serve and `ray.kill`: tests/integration/test_replica_kill.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from app.api.schemas import CompletionRequest
from app.choice_flow import ModelInfo, RecoveryPolicy
from app.cluster import ReplicaLost
from app.service import ChatService
from app.tools import ToolPlan, output_grammar
from deployments.decode.server import DecodeServer
from deployments.prefill.server import PrefillServer
from deployments.protocol import DecodeJob, KVHandoff, PrefillJob, TransferStats
from deployments.traffic.mover import KVMover
from engine import EngineConfig, EngineCore
from engine.output import RequestOutput
from tests.app.test_service import LocalBackend

pytest.importorskip("nixl")
pytestmark = pytest.mark.model  # real engines on the converted model
MODEL = "tiny"
PROMPT = "A short history of the lighthouse keepers of the northern coast"
MAX_TOKENS = 14


class LosingBackend(LocalBackend):
    """LocalBackend whose replicas "die": each scheduled loss ends the engine's stream (the
    engine request is aborted, as the dead actor's would be) and raises ReplicaLost."""

    def __init__(self, prefill: PrefillServer, decode: DecodeServer):
        super().__init__(prefill, decode)
        self.lose_pe_before_first: int = 0  # PE losses before the first token
        self.lose_pe_after_first: bool = False  # the PE dies before its KV handoff
        self.lose_de_after: list[int] = []  # DE losses, after this many outputs of that DE
        self.decode_jobs: list[DecodeJob] = []

    async def prefill(self, node: str, job: PrefillJob) -> AsyncIterator[RequestOutput | KVHandoff]:
        if self.lose_pe_before_first:
            self.lose_pe_before_first -= 1
            raise ReplicaLost("PrefillEngine: ActorDiedError", "prefill")
        async for item in self.prefill_server.prefill(job):
            if isinstance(item, KVHandoff) and self.lose_pe_after_first:
                self.lose_pe_after_first = False
                self.prefill_server.mover.transport.release(item.descriptor)
                raise ReplicaLost("PrefillEngine: ActorDiedError", "prefill")
            yield item

    async def decode(self, node: str, job: DecodeJob) -> AsyncIterator[RequestOutput]:
        self.decode_jobs.append(job)
        limit = self.lose_de_after.pop(0) if self.lose_de_after else None
        stream = self.decode_server.generate(job)
        try:
            count = 0
            async for out in stream:
                if count == limit:
                    raise ReplicaLost("DecodeEngine: ActorDiedError", "decode")
                count += 1
                yield out
        finally:
            await stream.aclose()  # the "dead" DE's request ends: its blocks are freed


@pytest.fixture(scope="module")
def losing(model_dir):
    from kvstore.transfer.nixl import NixlTransport

    servers = []
    for role, cls in (("pe", PrefillServer), ("de", DecodeServer)):
        engine = EngineCore(EngineConfig(model=model_dir, num_threads=1, kv_cache_bytes=64 << 20))
        mover = KVMover(NixlTransport(staging_bytes=32 << 20), TransferStats(role, "n0", cls.role))
        servers.append(cls(engine, mover, role))
    prefill, decode = servers
    for server in servers:
        server.loop.start()
    backend = LosingBackend(prefill, decode)
    engine = prefill.engine
    info = ModelInfo(MODEL, engine.max_model_len, engine.model_config.vocab_size)
    recovery = RecoveryPolicy(max_retries=3)
    service = ChatService(engine.tokenizer, info, backend, 16, recovery=recovery)
    yield service, backend
    for server in servers:
        server.loop.stop()
        server.mover.close()


async def _stream(service: ChatService, **params) -> tuple[list[int], str]:
    request = CompletionRequest(
        model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, stream=True, ignore_eos=True, **params
    )
    ids: list[int] = []
    text = ""
    async for out in service.run("r", service.completion_prompt(request), _params(request)):
        ids += out.new_token_ids
        text += out.new_text
    return ids, text


def _params(request: CompletionRequest):
    params = request.sampling_params(MAX_TOKENS)
    if request.response_format is not None:  # as ChatService.params adds it
        grammar = output_grammar(ToolPlan(), request.response_format)
        params = params.model_copy(update={"grammar": grammar})
    return params


def run(service: ChatService, **params) -> tuple[list[int], str]:
    return asyncio.run(asyncio.wait_for(_stream(service, **params), 120))


@pytest.fixture(scope="module")
def expected(losing, engine):
    """What one engine produces for each sampling mode: the fault-free reference."""
    service, _ = losing
    request = CompletionRequest(model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS)
    prompt = service.completion_prompt(request)
    out = {}
    for name, params in PARAMS.items():
        req = CompletionRequest(
            model=MODEL, prompt=PROMPT, max_tokens=MAX_TOKENS, ignore_eos=True, **params
        )
        (alone,) = engine.generate([prompt], _params(req))
        out[name] = (alone.new_token_ids, alone.text)
    return out


# structured: a moved decode rebuilds its grammar state from the tokens already emitted
STORY = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 80, "maxLength": 120}},
    "required": ["story"],
}
PARAMS = {
    "greedy": {"temperature": 0},
    "seeded": {"temperature": 1.0, "seed": 1234},
    "structured": {
        "temperature": 1.0,
        "seed": 7,
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": STORY}},
    },
}


def _all_free(backend: LosingBackend, timeout_s: float = 10.0) -> bool:
    """Every KV block of both engines free (aborts reach the engine thread asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(
            s.engine.block_manager.num_free_blocks == s.engine.block_manager.num_blocks
            and not s.engine.has_unfinished()
            for s in (backend.prefill_server, backend.decode_server)
        ):
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("mode", PARAMS)
def test_de_lost_twice_mid_stream_continues_token_identical(losing, expected, mode):
    service, backend = losing
    backend.decode_jobs.clear()
    backend.lose_de_after = [3, 4]  # dies after 3 outputs, its replacement after 4 more
    before = service.replica_losses["decode"]
    ids, text = run(service, **PARAMS[mode])
    assert service.replica_losses["decode"] == before + 2
    assert (ids, text) == expected[mode]
    if mode == "structured":
        assert text.startswith('{"story": "') and len(ids) == MAX_TOKENS
    first, *moved = backend.decode_jobs
    assert first.handoff is not None and len(moved) == 2
    if mode != "structured":  # (a structured output's fast-forwarded tokens come in groups)
        assert [len(j.emitted) for j in moved] == [1 + 3, 1 + 3 + 4]  # PE's token + streamed
    assert all(j.handoff is None and j.target_replica is None for j in moved)
    assert moved[1].emitted == tuple(ids[: len(moved[1].emitted)])
    assert 0 < len(moved[0].emitted) < len(moved[1].emitted) < len(ids)
    assert _all_free(backend)


def test_pe_lost_before_the_first_token_is_planned_again(losing, expected):
    service, backend = losing
    backend.lose_pe_before_first = 2
    backend.lost_replicas.clear()
    assert run(service, **PARAMS["seeded"]) == expected["seeded"]
    assert backend.lose_pe_before_first == 0
    assert backend.lost_replicas == ["pe", "pe"]  # the Scheduler stops planning onto it
    assert _all_free(backend)


def test_pe_lost_after_the_first_token_the_de_recomputes(losing, expected):
    service, backend = losing
    backend.decode_jobs.clear()
    backend.lose_pe_after_first = True
    assert run(service, **PARAMS["greedy"]) == expected["greedy"]
    (job,) = backend.decode_jobs
    assert job.handoff is None and len(job.emitted) == 1
    assert _all_free(backend)


def test_retries_are_bounded(losing):
    service, backend = losing
    backend.lose_de_after = [2, 0, 0, 0]  # one more loss than max_retries=3
    with pytest.raises(ReplicaLost):
        run(service, **PARAMS["greedy"])
    backend.lose_de_after = []
    assert _all_free(backend)
