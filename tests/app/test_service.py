"""ChatService over an in-process PD pair (no Ray): two real engines, each on its own
EngineLoop thread, KV moving between them through NIXL in this process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from app.api.errors import APIError, to_api_error
from app.api.schemas import ChatCompletionRequest, CompletionRequest
from app.choice_flow import ModelInfo
from app.service import ChatService
from deployments.decode.server import DecodeServer
from deployments.prefill.server import PrefillServer
from deployments.protocol import (
    DecodeJob,
    KVHandoff,
    Plan,
    PlanRequest,
    PrefillJob,
    StoredPrefix,
    TransferStats,
)
from deployments.scheduler.policy import plan_and_note
from deployments.scheduler.view import ClusterView
from deployments.traffic.mover import KVMover
from engine import EngineConfig, EngineCore
from engine.output import RequestOutput
from tests.helpers import wait_for

pytest.importorskip("nixl")
pytestmark = pytest.mark.model  # real engines on the converted model
MODEL = "tiny"


class LocalBackend:
    """The three hops as direct calls: what ServeCluster does over handles."""

    def __init__(self, prefill: PrefillServer, decode: DecodeServer):
        self.prefill_server, self.decode_server = prefill, decode
        self.view = ClusterView()
        self.released: list[str] = []  # plans dropped before the DE took them
        self.lost_replicas: list[str] = []  # replicas reported lost to the Scheduler

    async def plan(self, request: PlanRequest) -> Plan:
        for server in (self.prefill_server, self.decode_server):
            self.view.update(server.load_report())
        return plan_and_note(request, self.view, time.time())

    def release(self, request_id: str) -> None:
        self.released.append(request_id)

    async def replace_decode(self, request_id: str, lost_replica: str, num_tokens: int):
        return None  # one decode engine: the moved choice stays on its node

    async def lost(self, replica_id: str) -> None:
        self.lost_replicas.append(replica_id)

    async def lookup(self, block_keys) -> StoredPrefix:
        return StoredPrefix()

    async def load(self, node: str, keys, request_id: str = "", dram_only: bool = False) -> list:
        return []

    async def prefill(self, node: str, job: PrefillJob) -> AsyncIterator[RequestOutput | KVHandoff]:
        assert job.target_replica == "pe"
        async for item in self.prefill_server.prefill(job):
            yield item

    async def decode(self, node: str, job: DecodeJob) -> AsyncIterator[RequestOutput]:
        assert job.target_replica == "de"
        async for out in self.decode_server.generate(job):
            yield out


@pytest.fixture(scope="module")
def pd(model_dir):
    from kvstore.transfer.nixl import NixlTransport

    servers = []
    for role, cls in (("pe", PrefillServer), ("de", DecodeServer)):
        engine = EngineCore(EngineConfig(model=model_dir, num_threads=1, kv_cache_bytes=64 << 20))
        stats = TransferStats(replica_id=role, node_id="n0", role=cls.role)
        mover = KVMover(NixlTransport(staging_bytes=32 << 20), stats)
        servers.append(cls(engine, mover, role))
    prefill, decode = servers
    prefill.loop.start()
    decode.loop.start()
    service = ChatService(
        prefill.engine.tokenizer,
        ModelInfo(MODEL, prefill.engine.max_model_len, prefill.engine.model_config.vocab_size),
        LocalBackend(prefill, decode),
        default_max_tokens=16,
    )
    yield service, prefill, decode
    for server in servers:
        server.loop.stop()
        server.mover.close()


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def chat_request(text, **kw):
    return ChatCompletionRequest(
        model=MODEL, messages=[{"role": "user", "content": text}], **{"temperature": 0, **kw}
    )


def test_chat_equals_engine_alone_and_counts_usage(pd, engine):
    service, prefill, decode = pd
    request = chat_request("What is the capital of France?", max_tokens=12)
    reply = run(service.chat(request))
    prompt = service.chat_prompt(request)
    (want,) = engine.generate([prompt], request.sampling_params(16))
    assert reply.choices[0].message.content == want.text
    assert reply.usage.prompt_tokens == len(prompt)
    assert reply.usage.completion_tokens == want.num_output_tokens
    assert prefill.mover.stats.bytes_sent == decode.mover.stats.bytes_received > 0


def test_n_choices_run_concurrently_with_distinct_seeds(pd):
    service, _, _ = pd
    request = CompletionRequest(
        model=MODEL,
        prompt="The three primary colors are",
        max_tokens=10,
        n=3,
        seed=5,
        temperature=1.0,
    )
    first = run(service.complete(request))
    again = run(service.complete(request))
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert len({c.text for c in first.choices}) > 1
    assert 3 <= first.usage.completion_tokens <= 30  # each choice: EOS or 10 tokens


def test_stream_chunks_rebuild_the_reply(pd):
    service, _, _ = pd
    request = chat_request(
        "Name a fruit.", max_tokens=10, stream=True, stream_options={"include_usage": True}
    )

    async def collect():
        return [c async for c in service.chat_stream(request)]

    chunks = run(collect())
    full = run(service.chat(chat_request("Name a fruit.", max_tokens=10)))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_streamed_token_ids_are_all_there_while_text_is_held_back(pd):
    """A long stop string holds back text for several tokens; with `return_token_ids` the
    chunks must still carry every generated id (an agent rebuilds its context from them)."""
    service, _, _ = pd
    kw = {"temperature": 0, "max_tokens": 12, "ignore_eos": True, "return_token_ids": True}
    kw |= {"stop": ["~" * 30]}
    whole = run(service.complete(CompletionRequest(model=MODEL, prompt="Once upon a", **kw)))

    async def collect():
        request = CompletionRequest(model=MODEL, prompt="Once upon a", stream=True, **kw)
        return [c async for c in service.complete_stream(request)]

    ids = [i for c in run(collect()) for choice in c.choices for i in choice.token_ids or []]
    assert ids == whole.choices[0].token_ids and len(ids) == 12


def test_prompt_too_long_and_max_tokens_too_large_are_400(pd):
    service, _, _ = pd
    with pytest.raises(APIError) as info:
        run(service.chat(chat_request("hi " * 9000)))
    assert info.value.status == 400 and info.value.code == "context_length_exceeded"
    with pytest.raises(APIError) as info:
        run(service.chat(chat_request("hi", max_tokens=10**6)))
    assert info.value.param == "max_tokens"


def test_unknown_model_is_404(pd):
    service, _, _ = pd
    request = chat_request("hi").model_copy(update={"model": "other"})
    with pytest.raises(APIError) as info:
        run(service.chat(request))
    assert to_api_error(info.value).status == 404


def test_cancelled_request_frees_blocks_on_both_engines(pd):
    service, prefill, decode = pd
    request = chat_request("Tell a long story.", max_tokens=500, ignore_eos=True, stream=True)

    async def leave_early():
        stream = service.chat_stream(request)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        await stream.aclose()
        await wait_for(lambda: decode.loop.load["num_running"] == 0, "the DE aborts the request")

    run(leave_early())
    for server in (prefill, decode):
        bm = server.engine.block_manager
        assert bm.num_free_blocks == bm.num_blocks
