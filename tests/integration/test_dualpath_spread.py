"""DualPath on the real app (issue 19): concurrent agent turns with equal stored prefixes,
planned onto an idle 1P2D cluster, are read on both sides — not all on the PE's SNIC, as
when admission let one turn in at a time and the Scheduler forgot its planned reads — and
each node's SNIC reads exactly the blocks the Scheduler planned there."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from openai import AsyncOpenAI

from tests.helpers import wait_for
from tests.integration.conftest import MODEL

pytestmark = [pytest.mark.integration, pytest.mark.slow]
APP3 = "dualpath-spread"
NODES = ("pnode", "dnode0", "dnode1")
AGENTS, CONTEXT, BLOCK = 4, 320, 64


@pytest.fixture(scope="module")
def cluster(serve_port, model_dir, tmp_path_factory):
    from ray import serve

    from app.builder import build_app

    args = {
        "model": {"path": str(model_dir), "served_model_name": MODEL},
        # NOTE: engines take no CPU reservation here: the session app holds Ray's 2 CPUs
        "engine": {"kv_cache_bytes": "48MiB", "max_num_seqs": 8, "num_cpus": 0, "num_threads": 1},
        "transfer": {"transport": "object_store"},
        "scheduler": {"report_interval_s": 0.1, "policy": "dualpath"},
        # no DRAM tier: every hit is an NVMe read through a SNIC (admission at its defaults)
        "kvstore": {"path": str(tmp_path_factory.mktemp("kv-spread")), "dram_bytes": 0},
        "nodes": [
            {"name": "pnode", "prefill": 1, "snic_bandwidth": "40MB"},
            {"name": "dnode0", "decode": 1, "snic_bandwidth": "40MB"},
            {"name": "dnode1", "decode": 1, "snic_bandwidth": "40MB"},
        ],
    }
    serve.run(build_app(args), name=APP3, route_prefix="/spread")
    base = f"http://127.0.0.1:{serve_port}/spread"
    deadline = time.time() + 180
    while httpx.get(f"{base}/health", timeout=5).status_code != 200:
        assert time.time() < deadline, "the 1P2D app never became healthy"
        time.sleep(0.2)
    yield base
    serve.delete(APP3)


async def _stats() -> tuple[dict, dict[str, int]]:
    from ray import serve

    sched = await serve.get_deployment_handle("Scheduler", APP3).stats.remote()
    read = {}
    for n in NODES:
        tm = await serve.get_deployment_handle(f"TrafficManager-{n}", APP3).stats.remote()
        read[n] = tm["snic"]["bytes_read_total"]
    return sched, read


async def _idle() -> bool:
    """Every engine and SNIC of the cluster, as the Scheduler's latest reports show it, is
    idle: nothing running, waiting or queued."""
    from ray import serve

    scheduler = serve.get_deployment_handle("Scheduler", APP3)
    reports = await scheduler.engines.remote()
    nodes = (await scheduler.stats.remote())["nodes"]
    return (
        len(reports) == len(NODES)
        and all(r.num_running == r.num_waiting == r.num_queued_tokens == 0 for r in reports)
        and all(n["read_queue_bytes"] == n["write_queue_bytes"] == 0 for n in nodes.values())
    )


def test_concurrent_turns_with_equal_hits_read_on_both_sides(cluster):
    api = AsyncOpenAI(base_url=f"{cluster}/v1", api_key="unused", max_retries=0)
    prompts = [[(97 * a + 13 * i) % 40000 + 100 for i in range(CONTEXT)] for a in range(AGENTS)]

    async def turn(prompt: list[int]):
        return await api.completions.create(
            model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )  # fmt: skip

    async def both_turns() -> tuple[tuple[dict, dict[str, int]], list, tuple[dict, dict]]:
        firsts = await asyncio.gather(*(turn(p) for p in prompts))
        nexts = [
            p + r.choices[0].model_extra["token_ids"] + [7] * 40
            for p, r in zip(prompts, firsts, strict=True)
        ]
        # every turn-1 block is on NVMe (no write pending): equal hits, an idle cluster
        full = AGENTS * (CONTEXT // BLOCK)
        deadline = time.time() + 60
        while (await _stats())[0]["index"]["nvme_blocks"] < full:
            assert time.time() < deadline, "turn 1's blocks never reached NVMe"
            await asyncio.sleep(0.2)
        await wait_for(_idle, "the engines' and SNICs' reports show them idle", 30, 0.1)
        before = await _stats()
        seconds = await asyncio.gather(*(turn(p) for p in nexts))
        return before, seconds, await _stats()

    (sched0, read0), seconds, (sched, read) = asyncio.run(both_turns())
    paths = {k: v - sched0["read_paths"].get(k, 0) for k, v in sched["read_paths"].items()}
    assert sum(paths.values()) == AGENTS
    assert paths.get("pe", 0) >= 1 and paths.get("de", 0) + paths.get("split", 0) >= 1, paths
    for r in seconds:  # every turn 2 reused its stored prefix
        assert r.usage.prompt_tokens_details.cached_tokens >= (CONTEXT // BLOCK) * BLOCK
    # each SNIC read exactly the blocks the Scheduler planned on its node
    planned = {n: sched["read_blocks"].get(n, 0) - sched0["read_blocks"].get(n, 0) for n in NODES}
    read_delta = {n: read[n] - read0[n] for n in NODES}
    block_bytes = {n: read_delta[n] // planned[n] for n in NODES if planned[n]}
    assert len(set(block_bytes.values())) == 1, (planned, read_delta)
    assert all(read_delta[n] == planned[n] * next(iter(block_bytes.values())) for n in NODES)
    assert sum(1 for n in NODES if planned[n]) >= 2  # reads spread over at least two SNICs
