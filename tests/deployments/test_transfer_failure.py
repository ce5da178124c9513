"""A PE→DE KV transfer that fails mid-way (reliability-tests E1/E2, fault injected into the
real NIXL transport): with `transfer.on_failure: recompute` the DE resumes from the PE's
first token and recomputes the KV, so greedy and seeded output are
token-identical to one engine; with `fail` the request fails. Never partial KV."""

from __future__ import annotations

import asyncio

import pytest

from app.api.schemas import CompletionRequest
from app.choice_flow import EngineFailure, ModelInfo
from app.service import ChatService
from deployments.decode.server import DecodeServer
from deployments.prefill.server import PrefillServer
from deployments.protocol import TransferStats
from deployments.traffic.mover import KVMover
from engine import EngineConfig, EngineCore
from tests.app.test_service import LocalBackend

pytest.importorskip("nixl")
pytestmark = pytest.mark.model  # real engines on the converted model
MODEL = "tiny"
PROMPT = "The history of the printing press begins"


class BrokenAfterOneLayer:
    """The real transport, except that receiving yields one layer and then fails."""

    def __init__(self, inner):
        self.inner, self.name, self.failures = inner, inner.name, 0

    def send(self, transfer_id, layers):
        return self.inner.send(transfer_id, layers)

    def recv(self, descriptor):
        for i, layer in enumerate(self.inner.recv(descriptor)):
            if i == 1:
                self.failures += 1
                raise ConnectionError("injected: peer reset during KV transfer")
            yield layer

    def release(self, descriptor):
        self.inner.release(descriptor)

    def close(self):
        self.inner.close()


@pytest.fixture(scope="module")
def broken_pd(model_dir):
    from kvstore.transfer.nixl import NixlTransport

    servers = []
    for role, cls in (("pe", PrefillServer), ("de", DecodeServer)):
        engine = EngineCore(EngineConfig(model=model_dir, num_threads=1, kv_cache_bytes=64 << 20))
        transport = NixlTransport(staging_bytes=32 << 20)
        if cls is DecodeServer:
            transport = BrokenAfterOneLayer(transport)
        mover = KVMover(transport, TransferStats(role, "n0", cls.role))
        servers.append(cls(engine, mover, role))
    prefill, decode = servers
    for server in servers:
        server.loop.start()
    engine = prefill.engine
    service = ChatService(
        engine.tokenizer,
        ModelInfo(MODEL, engine.max_model_len, engine.model_config.vocab_size),
        LocalBackend(prefill, decode),
        default_max_tokens=16,
    )
    yield service, decode
    for server in servers:
        server.loop.stop()
        server.mover.close()


def complete(service, **params):
    request = CompletionRequest(model=MODEL, prompt=PROMPT, max_tokens=14, **params)
    return asyncio.run(asyncio.wait_for(service.complete(request), 120)), request


@pytest.mark.parametrize("params", [{"temperature": 0}, {"temperature": 0.9, "seed": 11}])
def test_failed_transfer_is_recomputed_on_the_de_with_identical_output(broken_pd, engine, params):
    service, decode = broken_pd
    decode.on_transfer_failure = "recompute"
    before = decode.num_transfer_failures
    reply, request = complete(service, **params, ignore_eos=True)
    assert decode.num_transfer_failures == before + 1  # the fault really happened
    prompt = service.completion_prompt(request)
    (alone,) = engine.generate([prompt], request.sampling_params(16))
    assert reply.choices[0].text == alone.text
    assert reply.usage.completion_tokens == 14
    assert decode.engine.block_manager.num_free_blocks == decode.engine.block_manager.num_blocks


def test_fail_policy_fails_the_request_instead(broken_pd):
    service, decode = broken_pd
    decode.on_transfer_failure = "fail"
    try:
        with pytest.raises((EngineFailure, ConnectionError)):
            complete(service, temperature=0)
    finally:
        decode.on_transfer_failure = "recompute"
