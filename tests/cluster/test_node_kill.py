"""Whole Ray nodes lost under traffic (issue 24), on a real cluster: a head (Serve, Ingress,
Scheduler) and two workers `na` and `nb`, each with a prefill engine, a decode engine and
its TrafficManager (its DRAM tier). Five times the node whose decode engine runs the most
streams is killed — its raylet and every process on it, as a host crash — while streams
run and new requests arrive; then it rejoins. Every request completes token-identical to a
fault-free run (greedy and seeded), with one audit line each, and every KV block is free
once idle. Then the Scheduler's replica is killed mid-traffic: it restarts, resyncs its
index from the TrafficManagers, and nothing is lost.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from openai import OpenAI

from ops.bench._serve import cluster_driver
from ops.cluster import WorkerSpec
from tests.cluster.conftest import MODEL, app_args, audit_lines, deploy
from tests.helpers import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.cluster]
APP = "nodekill"
WORKERS = ("na", "nb")
KILLS = 5
STREAMS = 4  # streams running when a node dies
ARRIVING = 2  # requests sent just before the kill (planned, reading or prefilling)
MAX_TOKENS = 20
TOPICS = ["tides", "glaciers", "volcanoes", "deserts", "forests", "rivers"]
MODES = [{"temperature": 0.0}, {"temperature": 0.9, "seed": 4242}]
PREAMBLE = "Background notes for the chapter, to be summarised for students. " * 40


def prompt(i: int) -> str:
    return f"{PREAMBLE}\nWrite a few sentences for a school textbook about {TOPICS[i % 6]}."


def complete(base: str, i: int, started: threading.Event | None = None) -> tuple[list, str]:
    """One streamed completion through the openai client: (token ids, text); sets `started`
    after its third token."""
    client = OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=600)
    stream = client.completions.create(
        model=MODEL,
        prompt=prompt(i),
        max_tokens=MAX_TOKENS,
        stream=True,
        extra_body={"ignore_eos": True, "return_token_ids": True},
        **MODES[i % 6 % 2],  # each topic always greedy, or always seeded
    )
    ids: list[int] = []
    text = ""
    for chunk in stream:
        choice = chunk.choices[0]
        ids += (choice.model_extra or {}).get("token_ids") or []
        text += choice.text
        if started is not None and len(ids) >= 3:
            started.set()
    return ids, text


def engines_by_node(serve) -> dict[str, set[str]]:
    """Logical node -> roles with a fresh load report (the Scheduler's live view)."""
    reports = serve.get_deployment_handle("Scheduler", APP).engines.remote().result()
    out: dict[str, set[str]] = {}
    for r in reports:
        if time.time() - r.timestamp_s < 2.0:
            out.setdefault(r.node_id, set()).add(r.role)
    return out


def all_up(serve) -> bool:
    live = engines_by_node(serve)
    return all(live.get(n) == {"prefill", "decode"} for n in WORKERS)


def busiest_node(serve) -> str:
    reports = serve.get_deployment_handle("Scheduler", APP).engines.remote().result()
    decode = [r for r in reports if r.role == "decode" and time.time() - r.timestamp_s < 2.0]
    return max(decode, key=lambda r: r.num_running + r.num_waiting).node_id


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nodekill")
    with cluster_driver([WorkerSpec(n, num_cpus=2) for n in WORKERS]) as (c, port):
        yield c, port, tmp


def test_five_node_kills_and_a_scheduler_kill_lose_nothing(cluster, model_dir):
    import ray
    from ray import serve

    c, port, tmp = cluster
    nodes = [{"name": n, "prefill": 1, "decode": 1, "ray_resources": {n: 0.01}} for n in WORKERS]
    base = deploy(APP, app_args(model_dir, tmp, nodes), port)
    reference = {i: complete(base, i) for i in range(len(TOPICS))}
    assert all(len(ids) == MAX_TOKENS for ids, _ in reference.values())
    ingress = serve.get_deployment_handle("Ingress", APP)
    losses_before = sum(ingress.admission_stats.remote().result()["replica_losses"].values())

    results: list[tuple[int, tuple[list, str]]] = []
    timings: list[float] = []
    n = len(TOPICS)
    with ThreadPoolExecutor(STREAMS + ARRIVING) as pool:
        for kill in range(KILLS):
            wait_until(
                lambda: all_up(serve),
                "both nodes' engines reporting",
                timeout_s=240,
                interval_s=0.25,
            )
            first = n + kill * (STREAMS + ARRIVING)
            started = [threading.Event() for _ in range(STREAMS)]
            futures = {
                first + j: pool.submit(complete, base, first + j, started[j])
                for j in range(STREAMS)
            }
            for event in started:
                assert event.wait(300), "a stream never started"
            victim = busiest_node(serve)
            for j in range(STREAMS, STREAMS + ARRIVING):  # arrive as the node dies
                futures[first + j] = pool.submit(complete, base, first + j)
            t0 = time.time()
            c.kill(victim)
            results += [(i, f.result(timeout=600)) for i, f in futures.items()]
            timings.append(time.time() - t0)
            c.join(victim)
        wait_until(
            lambda: all_up(serve),
            "the last node's engines reporting",
            timeout_s=240,
            interval_s=0.25,
        )

        # the Scheduler's replica killed mid-traffic: Serve restarts it, it resyncs
        first = n + KILLS * (STREAMS + ARRIVING)
        started = [threading.Event() for _ in range(STREAMS)]
        futures = {
            first + j: pool.submit(complete, base, first + j, started[j]) for j in range(STREAMS)
        }
        for event in started:
            assert event.wait(300)
        (scheduler,) = [
            a["name"]
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{APP}#Scheduler#")
        ]
        ray.kill(ray.get_actor(scheduler, namespace="serve"), no_restart=False)
        futures[first + STREAMS] = pool.submit(complete, base, first + STREAMS)
        results += [(i, f.result(timeout=600)) for i, f in futures.items()]

    for i, got in results:
        assert got == reference[i % len(TOPICS)], f"request {i} differs"
    losses = sum(ingress.admission_stats.remote().result()["replica_losses"].values())
    assert losses - losses_before >= KILLS  # every kill hit requests on the lost node
    print(f"node kills: {KILLS}, requests {len(results)}, recovery s {timings}")

    # the restarted Scheduler knows the stored blocks again (full resyncs from the TMs)
    def resynced() -> bool:
        stats = serve.get_deployment_handle("Scheduler", APP).stats.remote().result()
        return stats["index"]["blocks"] > 0 and all_up(serve)

    wait_until(resynced, "the Scheduler's index resync", timeout_s=60, interval_s=0.25)
    lookup = serve.get_deployment_handle("Scheduler", APP)
    assert lookup.stats.remote().result()["index"]["nvme_blocks"] > 0

    # side effects once per request: one audit line each, billed its real token counts
    lines = [r for r in audit_lines(tmp) if r["route"].endswith("/v1/completions")]
    assert len(lines) == len(TOPICS) + len(results)
    assert len({r["request_id"] for r in lines}) == len(lines)
    assert {(r["status"], r["completion_tokens"]) for r in lines} == {("ok", MAX_TOKENS)}

    def idle() -> bool:
        reports = serve.get_deployment_handle("Scheduler", APP).engines.remote().result()
        fresh = [e for e in reports if time.time() - e.timestamp_s < 2.0]
        return len(fresh) == 4 and all(e.num_free_blocks == e.num_total_blocks for e in fresh)

    wait_until(idle, "every KV block free", timeout_s=60, interval_s=0.25)
    serve.delete(APP)
