"""DualPath end to end in one process (no Ray): two logical nodes, each with a real
TieredStore (NVMe files in a shared directory, its own StorageNIC), a PE on one node and a
DE on the other, KV moving PE→DE over NIXL.

A two-turn agent conversation: turn 1 runs cold and the DE persists its blocks; turn 2
(turn 1's context + reply + new tokens) reads the stored prefix on the PE side, the DE side,
split across both, or not at all. Greedy output must be token-identical every way, and
equal to one engine computing everything."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

import pytest

from app.api.schemas import CompletionRequest
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
from deployments.scheduler.policy import PolicyConfig, plan_and_note
from deployments.scheduler.view import ClusterView
from deployments.traffic.mover import KVMover
from deployments.traffic.node_store import NodeKVStore
from engine import EngineConfig, EngineCore
from engine.output import RequestOutput
from kvstore.keys import chain_keys, root_key
from kvstore.snic import StorageNIC
from kvstore.store import TieredStore
from kvstore.tiers.dram import DRAMTier
from kvstore.tiers.nvme import NVMeTier
from tests.helpers import chat, wait_for

pytest.importorskip("nixl")
pytestmark = pytest.mark.model  # real engines on the converted model
MODEL = "tiny"
SYSTEM = (
    "You are a coding agent working in a repository with a failing test suite. Read the "
    "tool output you are given, decide on the next shell command, and explain briefly why. "
    "Prefer small, reversible steps, and never delete files you did not create yourself."
)


class ClusterBackend:
    """plan (the live policy) → node stores → PE → DE, as direct calls."""

    def __init__(self, prefill: PrefillServer, decode: DecodeServer, nodes: dict[str, NodeKVStore]):
        self.prefill_server, self.decode_server, self.nodes = prefill, decode, nodes
        self.view = ClusterView()
        self.force: str | None = None  # read path to force: "none", "pe", "de", "split"
        self.plans: list[Plan] = []
        self.released: list[str] = []  # plans dropped before the DE took them
        self.lost_replicas: list[str] = []  # replicas reported lost to the Scheduler

    async def plan(self, request: PlanRequest) -> Plan:
        for server in (self.prefill_server, self.decode_server):
            self.view.update(server.load_report())
        for tm in self.nodes.values():
            self.view.update_node(tm.node_report(full_sync=True), time.time())
        plan = plan_and_note(request, self.view, time.time(), PolicyConfig("dualpath"))
        h = plan.num_hit_blocks
        forced = {"none": (0, 0), "pe": (h, 0), "de": (h, h), "split": (h, h // 2)}
        if self.force is not None:
            hits, de = forced[self.force]
            plan = dataclasses.replace(plan, num_hit_blocks=hits, num_de_blocks=de)
        self.plans.append(plan)
        return plan

    def release(self, request_id: str) -> None:
        self.released.append(request_id)

    async def replace_decode(self, request_id: str, lost_replica: str, num_tokens: int):
        return None  # one decode engine: the moved choice stays on its node

    async def lost(self, replica_id: str) -> None:
        self.lost_replicas.append(replica_id)

    async def lookup(self, block_keys) -> StoredPrefix:
        return StoredPrefix(self.view.index.longest_prefix(block_keys))

    async def load(self, node: str, keys, request_id: str = "", dram_only: bool = False) -> list:
        return await asyncio.to_thread(self.nodes[node].load, keys, None, request_id, dram_only)

    async def prefill(self, node: str, job: PrefillJob) -> AsyncIterator[RequestOutput | KVHandoff]:
        assert node == "pnode"
        async for item in self.prefill_server.prefill(job):
            yield item

    async def decode(self, node: str, job: DecodeJob) -> AsyncIterator[RequestOutput]:
        assert node == "dnode"
        async for out in self.decode_server.generate(job):
            yield out


def node_store(name: str, root) -> NodeKVStore:
    return NodeKVStore(
        name,
        TieredStore(
            name,
            DRAMTier(0, 0),  # no DRAM cache: every hit is read from NVMe through the SNIC
            NVMeTier(root, fsync=False),
            StorageNIC(name),
            wrap=lambda t: t,
            unwrap=lambda t: t,
            block_size=64,
            block_nbytes=0,  # set below from the engine's block size
        ),
    )


async def scenario(model_dir, tmp_path, engine_alone):
    from kvstore.transfer.nixl import NixlTransport

    nodes = {n: node_store(n, tmp_path / "nvme") for n in ("pnode", "dnode")}
    servers = []
    for node, cls in (("pnode", PrefillServer), ("dnode", DecodeServer)):
        engine = EngineCore(
            EngineConfig(
                model=model_dir, num_threads=1, kv_cache_bytes=64 << 20, enable_prefix_caching=False
            )
        )
        stats = TransferStats(replica_id=cls.role, node_id=node, role=cls.role)
        mover = KVMover(NixlTransport(staging_bytes=32 << 20), stats)

        async def persist(items, tm=nodes[node]):
            tm.persist(items)

        servers.append(
            cls(engine, mover, cls.role, node, persist=persist if cls is DecodeServer else None)
        )
    prefill, decode = servers
    block_nbytes = prefill.load_report().kv_bytes_per_token * 64
    for tm in nodes.values():
        tm.store.block_nbytes = tm.store.dram.block_nbytes = block_nbytes
    for server in servers:
        await server.start()
    backend = ClusterBackend(prefill, decode, nodes)
    service = ChatService(
        prefill.engine.tokenizer,
        ModelInfo(
            MODEL,
            prefill.engine.max_model_len,
            prefill.engine.model_config.vocab_size,
            prefill.engine.model_id,
            64,
        ),
        backend,
        default_max_tokens=16,
    )
    try:
        # turn 1: cold; the DE persists every full block (prompt + reply)
        turn1 = chat(
            prefill.engine, "The test `test_parse_date` fails with a KeyError.", SYSTEM * 3
        )
        params = {"temperature": 0, "max_tokens": 70, "ignore_eos": True}
        await service.complete(CompletionRequest(model=MODEL, prompt=turn1, **params))
        # the agent's next prompt holds the reply's exact tokens (what the DE generated)
        (alone,) = engine_alone.generate(
            [turn1], CompletionRequest(model=MODEL, prompt=turn1, **params).sampling_params(16)
        )
        reply = alone.new_token_ids
        full = (len(turn1) + len(reply) - 1) // 64  # the last token's KV is never computed
        await wait_for(lambda: decode.num_persisted_blocks == full, "the DE persists turn 1")
        for tm in nodes.values():
            tm.store.flush()
        # turn 2: context + reply + tool output
        tool = prefill.engine.tokenizer.encode(" $ pytest -x\nE KeyError: 'tz'\n1 failed in 0.2s")
        turn2 = turn1 + reply + tool
        results = {}
        for path in ("none", "pe", "de", "split"):
            backend.force = path
            before = {n: tm.store.snic.metrics().bytes_read_total for n, tm in nodes.items()}
            out = await service.complete(
                CompletionRequest(model=MODEL, prompt=turn2, temperature=0, max_tokens=12)
            )
            read = {
                n: tm.store.snic.metrics().bytes_read_total - before[n] for n, tm in nodes.items()
            }
            results[path] = (out, backend.plans[-1], read)
        # a corrupt block file: the hit prefix ends before it and the PE recomputes the rest
        hits = results["pe"][1].num_hit_blocks
        keys = chain_keys(root_key(prefill.engine.model_id), turn2, 64)
        path = nodes["pnode"].store.nvme.path_of(keys[hits // 2])
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
        backend.force = "pe"
        out = await service.complete(
            CompletionRequest(model=MODEL, prompt=turn2, temperature=0, max_tokens=12)
        )
        results["corrupt"] = (out, backend.plans[-1], {})

        # the handles' owner (a TrafficManager) dies after the read: fetching them fails on
        # the PE (it computes everything and sends it all), or on the DE only (it recomputes)
        async def lost(handles):
            raise RuntimeError("injected: the owner of these blocks died")

        backend.force = "de"  # dnode's copies are intact; the DE holds them all
        for name, server in (("lost_pe", prefill), ("lost_de", decode)):
            fetch, server.fetch_blocks = server.fetch_blocks, lost
            try:
                out = await service.complete(
                    CompletionRequest(model=MODEL, prompt=turn2, temperature=0, max_tokens=12)
                )
            finally:
                server.fetch_blocks = fetch
            results[name] = (out, backend.plans[-1], {})
        return turn2, results, block_nbytes, decode.num_persisted_blocks
    finally:
        for server in servers:
            await server.close()
        for tm in nodes.values():
            tm.store.snic.close()


def test_output_is_identical_whichever_side_reads_the_stored_kv(model_dir, tmp_path, engine):
    turn2, results, block_nbytes, persisted = asyncio.run(
        asyncio.wait_for(scenario(model_dir, tmp_path, engine), 240)
    )
    assert persisted >= 4
    (want,) = engine.generate(
        [turn2],
        CompletionRequest(model=MODEL, prompt=turn2, temperature=0, max_tokens=12).sampling_params(
            16
        ),
    )
    texts = {path: out.choices[0].text for path, (out, _, _) in results.items()}
    assert texts == dict.fromkeys(texts, want.text)

    plan = results["pe"][1]
    hits = plan.num_hit_blocks
    assert hits >= 4  # turn 1's prompt and reply blocks were stored
    cached = {
        path: out.usage.prompt_tokens_details.cached_tokens for path, (out, _, _) in results.items()
    }
    full = hits * 64
    assert cached == {
        "none": 0,
        "pe": full,
        "de": full,
        "split": full,
        "corrupt": hits // 2 * 64,
        "lost_pe": 0,  # computed by the PE after all
        "lost_de": full,  # the PE used them; the DE recomputed its own
    }
    # each side's SNIC read exactly the blocks the plan gave it
    assert results["none"][2] == {"pnode": 0, "dnode": 0}
    assert results["pe"][2] == {"pnode": hits * block_nbytes, "dnode": 0}
    assert results["de"][2] == {"pnode": 0, "dnode": hits * block_nbytes}
    half = hits // 2
    assert results["split"][2] == {
        "pnode": (hits - half) * block_nbytes,
        "dnode": half * block_nbytes,
    }
