"""Two logical nodes in the real app: the PE on one, the DE on the other, each with its own
TrafficManager (KV store + SNIC). With `dualpath_split` a turn's stored blocks are read on
both sides at once: the DE-side part stays on the DE node, the PE gets all of it, and only
the rest of the KV travels PE → DE. Greedy output equals one engine computing everything."""

from __future__ import annotations

import time

import httpx
import pytest
from openai import OpenAI

from engine.sampling_params import SamplingParams
from tests.integration.conftest import MODEL, wait_for_trace

pytestmark = [pytest.mark.integration, pytest.mark.slow]
APP2 = "dualpath-nodes"


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    return tmp_path_factory.mktemp("traces-nodes")


@pytest.fixture(scope="module")
def two_nodes(serve_port, model_dir, tmp_path_factory, traces):
    from ray import serve

    from app.builder import build_app

    args = {
        "model": {"path": str(model_dir), "served_model_name": MODEL},
        # NOTE: engines take no CPU reservation here: the session app holds Ray's 2 CPUs
        "engine": {"kv_cache_bytes": "64MiB", "max_num_seqs": 8, "num_cpus": 0, "num_threads": 1},
        "transfer": {"transport": "object_store"},
        "scheduler": {"report_interval_s": 0.1, "policy": "dualpath_split"},
        "kvstore": {"path": str(tmp_path_factory.mktemp("kv-nodes")), "dram_bytes": 0},
        "tracing": {"path": str(traces)},
        "nodes": [
            {"name": "pnode", "prefill": 1, "snic_bandwidth": "500MB"},
            {"name": "dnode", "decode": 1, "snic_bandwidth": "500MB"},
        ],
    }
    serve.run(build_app(args), name=APP2, route_prefix="/two")
    base = f"http://127.0.0.1:{serve_port}/two"
    deadline = time.time() + 120
    while httpx.get(f"{base}/health", timeout=5).status_code != 200:
        assert time.time() < deadline, "the two-node app never became healthy"
        time.sleep(0.2)
    yield base
    serve.delete(APP2)


def test_split_read_across_two_nodes_gives_identical_output(two_nodes, engine, traces):
    from pydoc_data.topics import topics

    from ray import serve

    api = OpenAI(base_url=f"{two_nodes}/v1", api_key="unused", max_retries=0)
    ids = engine.tokenizer.encode(topics["with"] + topics["while"])
    turn1, tool = ids[:500], ids[500:560]
    first = api.completions.create(
        model=MODEL,
        prompt=turn1,
        max_tokens=80,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    turn2 = turn1 + first.choices[0].model_extra["token_ids"] + tool
    # NOTE: wait until the Scheduler's index holds all 9 full blocks of turn 1 (the DE hands
    # its decoded blocks to its node's store, the next node report carries the events);
    # fixed sleeps here were too short on a loaded 2-core machine.
    scheduler = serve.get_deployment_handle("Scheduler", APP2)
    deadline = time.time() + 30
    while scheduler.stats.remote().result()["index"]["blocks"] < len(turn2[:580]) // 64:
        assert time.time() < deadline, "turn 1's blocks never reached the Scheduler's index"
        time.sleep(0.2)

    second = api.completions.create(model=MODEL, prompt=turn2, max_tokens=16, temperature=0)
    (want,) = engine.generate([turn2], SamplingParams(temperature=0, max_tokens=16))
    assert second.choices[0].text == want.text
    assert second.usage.prompt_tokens_details.cached_tokens >= (580 // 64 - 1) * 64

    sched = serve.get_deployment_handle("Scheduler", APP2).stats.remote().result()
    assert sched["read_paths"].get("split", 0) >= 1
    reads = {
        node: serve.get_deployment_handle(f"TrafficManager-{node}", APP2)
        .stats.remote()
        .result()["snic"]["bytes_read_total"]
        for node in ("pnode", "dnode")
    }
    assert reads["pnode"] > 0 and reads["dnode"] > 0  # both SNICs read part of the hit

    # one trace across six processes: each deployment's spans under the ingress's
    spans = wait_for_trace(traces, second.id, 6)
    assert len({s["trace_id"] for s in spans}) == 1
    by_id = {s["span_id"]: s for s in spans}

    def parent(s):
        return by_id[s["parent_id"]]

    assert {s["service"] for s in spans} >= {
        "dualpath.ingress",
        "dualpath.scheduler",
        "dualpath.prefill.pnode",
        "dualpath.decode.dnode",
        "dualpath.traffic.pnode",
        "dualpath.traffic.dnode",
    }
    named = {s["name"]: s for s in spans}
    assert parent(named["scheduler.plan"])["name"] == "schedule"
    assert parent(named["pe.prefill"])["name"] == "prefill"
    assert parent(named["de.decode"])["name"] == "decode"
    snic = [s for s in spans if s["name"] == "kv.snic_read"]
    assert sorted(s["service"] for s in snic) == [
        "dualpath.traffic.dnode",
        "dualpath.traffic.pnode",
    ]
    for s in snic:  # the DE-side read went to dnode's SNIC, the PE-side to pnode's
        side = parent(s)["attributes"]["side"]
        assert (
            s["service"] == {"de": "dualpath.traffic.dnode", "pe": "dualpath.traffic.pnode"}[side]
        )
        assert s["attributes"]["blocks_read"] == parent(s)["attributes"]["blocks_read"] > 0
    assert named["pe.prefill"]["attributes"]["cached_tokens"] == (
        second.usage.prompt_tokens_details.cached_tokens
    )
