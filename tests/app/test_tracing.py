"""One request, one trace: the span tree the request path produces, in one process (no Ray).

Two logical nodes with real NVMe-tier stores, a PE and a DE with real engines, KV moving
over NIXL. Turn 1 stores its blocks; turn 2 reads them on both sides (split). Its trace must
be: root → choice → schedule, kv.load (→ kv.read de, kv.read pe), prefill (→ pe.prefill →
kv.fetch, engine.queue, engine.chunk…; kv.send), decode (→ de.decode → kv.receive,
kv.fetch, engine.queue), every span inside its parent's time, the numbers on the spans
equal to what the response says. The cross-process version runs in the integration tests.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from app.admission.gate import Caller
from app.api.schemas import CompletionRequest
from app.auth import Authenticator, AuthSection
from app.choice_flow import ModelInfo
from app.root_spans import RootSpans, current
from app.service import ChatService
from deployments.decode.server import DecodeServer
from deployments.prefill.server import PrefillServer
from deployments.protocol import TransferStats
from deployments.tracing import REQUEST_ID
from deployments.traffic.mover import KVMover
from engine import EngineConfig, EngineCore
from tests.app.test_dualpath_flow import ClusterBackend, node_store
from tests.helpers import chat, wait_for

pytest.importorskip("nixl")
pytestmark = pytest.mark.model  # real engines on the converted model
MODEL = "tiny"


async def two_turns(model_dir, tmp_path, roots: RootSpans):
    from kvstore.transfer.nixl import NixlTransport

    nodes = {n: node_store(n, tmp_path / "nvme") for n in ("pnode", "dnode")}
    servers = []
    for node, cls in (("pnode", PrefillServer), ("dnode", DecodeServer)):
        engine = EngineCore(EngineConfig(model=model_dir, num_threads=1, kv_cache_bytes=64 << 20))
        mover = KVMover(
            NixlTransport(staging_bytes=32 << 20), TransferStats(cls.role, node, cls.role)
        )

        async def persist(items, tm=nodes[node]):
            tm.persist(items)

        servers.append(
            cls(engine, mover, cls.role, node, persist=persist if cls is DecodeServer else None)
        )
    prefill, decode = servers
    for tm in nodes.values():
        tm.store.block_nbytes = prefill.load_report().kv_bytes_per_token * 64
    for server in servers:
        await server.start()
    backend = ClusterBackend(prefill, decode, nodes)
    engine = prefill.engine
    info = ModelInfo(MODEL, engine.max_model_len, engine.model_config.vocab_size, engine.model_id)
    service = ChatService(engine.tokenizer, info, backend, default_max_tokens=16)
    try:
        turn1 = chat(engine, "Summarise the failing test output. " * 20)
        first = await service.complete(
            CompletionRequest(
                model=MODEL, prompt=turn1, temperature=0, max_tokens=8, return_token_ids=True
            )
        )
        reply = first.choices[0].token_ids
        full = (len(turn1) + len(reply) - 1) // 64  # the last token's KV is never computed
        await wait_for(lambda: decode.num_persisted_blocks == full, "the DE persists turn 1")
        for tm in nodes.values():
            tm.store.flush()
        turn2 = turn1 + reply + [13] * 40
        backend.force = "split"
        rid = roots.start("POST /v1/completions", "/v1/completions")
        with current(roots.span(rid)):
            out = await service.complete(
                CompletionRequest(
                    model=MODEL, prompt=turn2, temperature=0, max_tokens=6, ignore_eos=True
                ),
                Caller(Authenticator(AuthSection()).anonymous, "default", "/v1/completions", rid),
            )
        roots.end(rid, 200)
        return rid, out, backend.plans[-1]
    finally:
        for server in servers:
            await server.close()
        for tm in nodes.values():
            tm.store.snic.close()


def test_a_request_is_one_trace_with_the_expected_span_tree(model_dir, tmp_path, spans):
    roots = RootSpans()
    rid, out, plan = asyncio.run(asyncio.wait_for(two_turns(model_dir, tmp_path, roots), 240))
    assert plan.num_hit_blocks >= 2 and 0 < plan.num_de_blocks < plan.num_hit_blocks
    assert not roots.open  # the root ended

    finished = spans.get_finished_spans()
    (root,) = [s for s in finished if s.attributes.get(REQUEST_ID) == rid and s.parent is None]
    trace_id = root.context.trace_id
    mine = [s for s in finished if s.context.trace_id == trace_id]
    children = defaultdict(list)
    for s in mine:
        if s.parent is not None:
            children[s.parent.span_id].append(s)
    by_id = {s.context.span_id: s for s in mine}
    assert all(s.parent is None or s.parent.span_id in by_id for s in mine)  # no orphans

    def kids(span):
        return sorted(c.name for c in children[span.context.span_id])

    def one(parent, name):
        (found,) = [c for c in children[parent.context.span_id] if c.name == name]
        return found

    assert root.attributes["http.response.status_code"] == 200
    assert kids(root) == ["choice"]
    choice = one(root, "choice")
    assert choice.attributes["dualpath.request_id"] == rid  # n = 1: the engines' id too
    assert kids(choice) == ["decode", "kv.load", "prefill", "schedule"]
    assert one(choice, "schedule").attributes["num_de_blocks"] == plan.num_de_blocks
    load = one(choice, "kv.load")
    reads = {c.attributes["side"]: c for c in children[load.context.span_id]}
    assert set(reads) == {"de", "pe"}
    assert reads["de"].attributes["blocks_read"] == plan.num_de_blocks
    assert reads["pe"].attributes["blocks_read"] == plan.num_hit_blocks - plan.num_de_blocks

    prefill = one(choice, "prefill")
    assert [e.name for e in prefill.events] == ["first_token"]
    assert kids(prefill) == ["kv.send", "pe.prefill"]
    pe = one(prefill, "pe.prefill")
    cached = out.usage.prompt_tokens_details.cached_tokens
    assert pe.attributes["cached_tokens"] == cached == plan.num_hit_blocks * 64
    pe_kids = kids(pe)
    assert pe_kids.count("engine.queue") == 1 and pe_kids.count("kv.fetch") == 1
    assert set(pe_kids) == {"engine.chunk", "engine.queue", "kv.fetch"}
    chunks = [c for c in children[pe.context.span_id] if c.name == "engine.chunk"]
    assert sum(c.attributes["tokens"] for c in chunks) == out.usage.prompt_tokens - cached
    assert one(prefill, "kv.send").attributes["bytes"] > 0

    decode = one(choice, "decode")
    (de,) = children[decode.context.span_id]
    assert de.name == "de.decode"
    assert sorted(set(kids(de))) == ["engine.queue", "kv.fetch", "kv.receive"]
    # the PE made the first token, the DE the rest
    assert de.attributes["output_tokens"] == out.usage.completion_tokens - 1

    for s in mine:  # every span lies within its parent's time
        if s.parent is not None:
            parent = by_id[s.parent.span_id]
            assert parent.start_time <= s.start_time <= s.end_time <= parent.end_time, s.name
