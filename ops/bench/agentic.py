"""Agentic trace replay: DualPath vs single-path KV loading on a SNIC-bound cluster.

    python -m ops bench agentic [--agents 4 --turns 6 --context 1024 --append 128]
        [--gen 8] [--snic-mbps 12] [--warmup-turns 1] [--online-rates 0.2,0.4]
        [--modes single_path,dualpath,dualpath_split,oracle] [--kv-cache-mib 160]
        [--layout emulated|cluster|both]
    python -m ops bench agentic --sweep [--shapes default,heavy-append] [--modes ...]

Trace (shaped like the paper's coding-agent traces, scaled down to a 2-core CPU machine and
stated in the output): every agent starts from `--context` tokens and runs `--turns` turns;
each turn appends ~`--append` tokens (tool output) and forces exactly ~`--gen` generated
tokens (EOS ignored). Replay: turn i+1's prompt = turn i's prompt + its generated tokens
(exact ids, `return_token_ids`) + the next append, so everything but the append and the
last partial block hits the KV store.

Cluster: 1 prefill node + 2 decode nodes, one engine each, every node with its own
TrafficManager and a StorageNIC capped at `--snic-mbps` (the paper's setting: storage
bandwidth is the bottleneck). The KV store has no DRAM cache (as the paper's 3FS): every
hit is read from the NVMe directory through a SNIC, or pulled from the write buffer of the
node that has not persisted it yet. `--layout` says where the nodes run: `emulated` (the
default) as logical nodes of one local Ray; `cluster` on a real Ray cluster on this machine
(ops.cluster: a head holding Serve, the Ingress and the Scheduler, and one raylet per node,
pnode / dnode0 / dnode1, each with its own object store, so pulls cross raylets); `both`
emulated first, then cluster, in one report (`vs_single` within each layout).

Offline JCT is timed after every agent's first (cold) turn, which fills the store — the
paper's trajectories run 157 turns at a 98.7% hit rate, so their cold turn is noise; ours
would be a third of the run. Modes, in one run on the same trace:
`single_path` (PE-side reads only: classic PD), `dualpath` (read on the side with the
shorter SNIC queue), `dualpath_split` (one request's blocks split over both sides),
`oracle` (dualpath with the SNIC caps removed: KV I/O is not the bottleneck),
`dualpath_nopull` (dualpath without cross-node DRAM pulls: a block in another node's DRAM
or write buffer is read through an SNIC instead; against `dualpath` it shows what the pulls
buy, `pulled_blocks` counts them). Offline: all
agents start together. Online (`--online-rates`): agents arrive as a Poisson process;
TTFT / TPOT percentiles per rate against a scaled SLO. Also measured in-process
(ops/bench/kv_hit.py): turn TTFT with a KV hit vs recompute at `--hit-context` tokens
(stored blocks read from real files), and the layer-wise import overlap.

`--sweep` replays several trace shapes (ops/bench/agentic_sweep.py) in one Ray start,
offline only; a shape flag given with it (`--turns 2`) overrides that value in every shape.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from engine.config import default_model_dir
from ops.bench._agentic_report import (
    COLUMNS,
    LAYOUTS,
    NODES,
    TurnRecord,
    add_vs_single,
    layouts_of,
    pct,
    plot,
    report_meta,
    summarize,
)
from ops.bench._report import write_report
from ops.bench._serve import cluster_session, deep_merge, deploy, serve_session
from ops.sim.traces import BENCH_TRACE, Agent, make_trace

logger = logging.getLogger(__name__)
APP = "dualpath-agentic"
MODEL = "bench-model"
MODES: dict[str, dict[str, Any]] = {  # mode -> its scheduler section (any other: the policy)
    "single_path": {"policy": "single_path"},
    "dualpath": {"policy": "dualpath"},
    "dualpath_split": {"policy": "dualpath_split"},
    "dualpath_nopull": {"policy": "dualpath", "dram_pulls": False},
    "oracle": {"policy": "dualpath"},  # and no SNIC caps
}
DEFAULT_SHAPE = BENCH_TRACE  # docs/BENCHMARKS.md's table; the sweep's `default` shape
DEFAULT_KV_CACHE_MIB = 160
NIXL_STAGING_MIB = 256  # deployments' default per-engine NIXL pool


async def _turn(http: httpx.AsyncClient, url: str, prompt: list[int], gen: int):
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": gen,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = last = None
    ids: list[int] = []
    usage: dict[str, Any] = {}
    timings: dict[str, float] = {}
    async with http.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            for choice in chunk.get("choices", []):
                if choice.get("token_ids"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    ids += choice["token_ids"]
            usage = chunk.get("usage") or usage
            timings = chunk.get("timings") or timings
    assert first is not None and last is not None
    tpot = (last - first) / (len(ids) - 1) if len(ids) > 1 else None
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return ids, first - start, tpot, cached, {k: v for k, v in timings.items() if v is not None}


async def replay(
    url: str, agents: list[Agent], bar: tqdm, warmup_turns: int = 0
) -> tuple[float, list[TurnRecord]]:
    """Run every agent's trajectory; returns (JCT, per-turn records).

    With `warmup_turns`, every agent first runs that many turns untimed (filling the KV
    store, as the shared context of a rollout already is), then all start the timed part
    together; JCT runs from there to the last agent's last turn.
    """
    records: list[TurnRecord] = []
    barrier = asyncio.Barrier(len(agents)) if warmup_turns else None
    timed_from: list[float] = []

    async def run(i: int, agent: Agent, http: httpx.AsyncClient) -> None:
        await asyncio.sleep(agent.start_s)
        prompt = list(agent.context)
        for turn, (append, gen) in enumerate(zip(agent.appends, agent.gens, strict=True)):
            if barrier is not None and turn == warmup_turns:
                await barrier.wait()
                timed_from.append(time.perf_counter())
            prompt += append
            ids, ttft, tpot, cached, timings = await _turn(http, url, prompt, gen)
            records.append(TurnRecord(i, turn, len(prompt), cached, ttft, tpot, timings))
            prompt += ids
            bar.update(1)

    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(run(i, a, http) for i, a in enumerate(agents)))
    start = min(timed_from) if timed_from else t0
    return time.perf_counter() - start, records


def app_args(
    args: argparse.Namespace, mode: str, kv_dir: Path, layout: str = "emulated"
) -> dict[str, Any]:
    """The app's args for one mode in one layout (`--app-args` merged in last). On the
    cluster each logical node is pinned to its raylet and the Ingress and the Scheduler to
    the head."""
    cap = None if mode == "oracle" else int(args.snic_mbps * 1e6)
    scheduler = {**MODES.get(mode, {"policy": mode}), "report_interval_s": 0.1}
    out: dict[str, Any] = {
        "model": {"path": str(args.model), "served_model_name": MODEL},
        "engine": {  # the shipped default (serve_config.yaml): int4, bf16 KV, ngram drafts
            "dtype": "bfloat16",
            "quantization": "int4",
            "speculative": {"method": "ngram"},
            "num_threads": 1,
            "max_num_batched_tokens": 2048,
        },
        "scheduler": scheduler,
        "kvstore": {"path": str(kv_dir), "dram_bytes": 0, "fsync": False},
        "nodes": [
            {"name": "pnode", "prefill": 1, "snic_bandwidth": cap},
            {"name": "dnode0", "decode": 1, "snic_bandwidth": cap},
            {"name": "dnode1", "decode": 1, "snic_bandwidth": cap},
        ],
    }
    if layout == "cluster":  # the names are the raylets' custom resources (cluster_session)
        for node in out["nodes"]:
            node["ray_resources"] = {node["name"]: 0.01}
        out["control_ray_resources"] = {"head": 0.01}
    out = deep_merge(out, args.app_args)
    # NOTE: --kv-cache-mib counts float32 KV; a bf16 pool of half the bytes holds as many
    # tokens, so the trace puts the same pressure on the engines whatever the KV dtype.
    engine = out["engine"]
    kv_dtype = engine.get("kv_dtype") or engine.get("dtype", "float32")
    kv_mib = max(1, args.kv_cache_mib * (4 if kv_dtype == "float32" else 2) // 4)
    engine.setdefault("kv_cache_bytes", f"{kv_mib}MiB")
    if kv_mib > NIXL_STAGING_MIB:  # a PE stages a whole prompt's KV for its DE
        out.setdefault("transfer", {"nixl_staging_bytes": f"{kv_mib}MiB"})
    return out


def _deploy(
    args: argparse.Namespace, mode: str, kv_dir: Path, port: int, layout: str = "emulated"
) -> str:
    return f"{deploy(APP, app_args(args, mode, kv_dir, layout), port)}/v1/completions"


def _cluster_stats() -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    from ray import serve

    nodes = {
        n: serve.get_deployment_handle(f"TrafficManager-{n}", APP).stats.remote().result()
        for n in NODES
    }
    sched = serve.get_deployment_handle("Scheduler", APP).stats.remote().result()
    return nodes, sched


def run_mode(
    args, mode: str, agents: list[Agent], port: int, layout: str = "emulated"
) -> list[dict[str, Any]]:
    rows = []
    loads = [] if args.skip_offline else [("offline", None)]
    loads += [(f"online {r}/s", r) for r in args.online_rates]
    for load, rate in loads:
        kv_dir = Path(tempfile.mkdtemp(prefix=f"dps-kv-{mode}-"))
        try:
            url = _deploy(args, mode, kv_dir, port, layout)
            rng = random.Random(args.seed + 1)
            t = 0.0
            for agent in agents:
                agent.start_s = 0.0 if rate is None else t
                if rate is not None:
                    t += rng.expovariate(rate)
            total = sum(len(a.gens) for a in agents)
            with tqdm(total=total, desc=f"{layout} {mode} {load}", unit="turn") as bar:
                warmup = args.warmup_turns if rate is None else 0
                jct, records = asyncio.run(replay(url, agents, bar, warmup))
            nodes, sched = _cluster_stats()
            row = summarize(mode, load, jct, records, nodes, sched, layout)
            warm = [r for r in records if r.turn > 0]
            ttft_p90 = pct([r.ttft_s for r in warm], 0.9)
            tpot_p90 = pct([r.tpot_s for r in records if r.tpot_s], 0.9)
            row["slo_ok"] = ttft_p90 <= args.slo_ttft_s and tpot_p90 * 1e3 <= args.slo_tpot_ms
            logger.info(
                "mode done", extra={"mode": mode, "layout": layout, "load": load, "jct_s": jct}
            )
            rows.append(row)
        finally:
            shutil.rmtree(kv_dir, ignore_errors=True)
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, shape defaults filled in (`args.shape_overrides`: the shape flags
    given) and the report name chosen."""
    p = argparse.ArgumentParser(prog="python -m ops bench agentic", description=__doc__)
    p.add_argument("--model", type=Path, default=default_model_dir())
    p.add_argument(
        "--modes",
        default="single_path,dualpath,dualpath_split,oracle",
        help="comma-separated, from: single_path (PE-side reads), dualpath (the shorter SNIC "
        "queue), dualpath_split (blocks split over both sides), oracle (dualpath, SNICs "
        "uncapped), dualpath_nopull (dualpath without cross-node DRAM pulls: what they buy)",
    )
    p.add_argument(
        "--layout",
        choices=[*LAYOUTS, "both"],
        default="emulated",
        help="emulated: logical nodes on one local Ray; cluster: a real Ray cluster on this "
        "machine (head + one raylet per node); both: emulated, then cluster, one report",
    )
    # NOTE: shape flags default to None so that --sweep can tell a given one (an override)
    p.add_argument("--agents", type=int, help="default 4")
    p.add_argument("--turns", type=int, help="default 6")
    p.add_argument("--context", type=int, help="tokens before the first turn (default 1024)")
    p.add_argument("--append", type=int, help="tokens appended per turn, mean (default 128)")
    p.add_argument("--gen", type=int, help="tokens generated per turn, mean (default 8)")
    p.add_argument("--kv-cache-mib", type=int, help="KV pool per engine (default 160)")
    p.add_argument(
        "--warmup-turns", type=int, default=1, help="untimed turns per agent before JCT starts"
    )
    p.add_argument("--snic-mbps", type=float, default=12.0, help="SNIC cap per node, MB/s")
    p.add_argument("--online-rates", default="", help="agent arrivals per second, e.g. 0.2,0.5")
    p.add_argument("--skip-offline", action="store_true", help="online rates only")
    p.add_argument("--slo-ttft-s", type=float, default=15.0, help="scaled SLO: warm TTFT p90")
    p.add_argument("--slo-tpot-ms", type=float, default=400.0, help="scaled SLO: TPOT p90")
    p.add_argument("--hit-context", type=int, default=8000, help="KV-hit TTFT context (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--app-args", type=json.loads, default={}, help="JSON merged into the app args")
    p.add_argument(
        "--name",
        help="report name (default agentic; agentic-cluster with --layout cluster or both; "
        "agentic-sweep)",
    )
    p.add_argument("--sweep", action="store_true", help="replay every shape (agentic_sweep.py)")
    p.add_argument("--shapes", default="", help="with --sweep: a subset, e.g. default,long-gen")
    args = p.parse_args(argv)
    args.online_rates = [float(r) for r in args.online_rates.split(",") if r]
    given = {k: v for k in [*DEFAULT_SHAPE, "kv_cache_mib"] if (v := getattr(args, k)) is not None}
    vars(args).update({**DEFAULT_SHAPE, "kv_cache_mib": DEFAULT_KV_CACHE_MIB, **given})
    args.shape_overrides = given
    if args.sweep:
        if args.online_rates or args.skip_offline:
            p.error("--sweep replays offline only")
        if args.layout != "emulated":
            p.error("--sweep runs the emulated layout only")
        args.name = args.name or "agentic-sweep"
    else:
        args.name = args.name or ("agentic" if args.layout == "emulated" else "agentic-cluster")
    return args


def _session(layout: str):
    if layout == "cluster":  # one 1-CPU raylet per engine; the head runs what needs no CPU
        from ops.cluster import WorkerSpec

        return cluster_session([WorkerSpec(n, num_cpus=1) for n in NODES], head_num_cpus=0)
    # NOTE: 3 engines of one thread each on a 2-core machine: Ray is told 4 logical CPUs.
    return serve_session(num_cpus=4)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    if args.sweep:
        from ops.bench.agentic_sweep import run_sweep

        return run_sweep(args, args.shape_overrides)

    from engine.config import ModelConfig
    from ops.bench.kv_hit import kv_hit_ttft

    # in-process first (no Ray running beside it): the KV-hit TTFT and import overlap
    hit = kv_hit_ttft(args.model, args.hit_context) if args.hit_context else None
    agents = make_trace(args, ModelConfig.from_dir(args.model).vocab_size)
    layouts = layouts_of(args.layout)
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    for layout in layouts:
        try:
            with _session(layout) as port:
                for mode in args.modes.split(","):
                    rows += run_mode(args, mode, agents, port, layout)
        except Exception as exc:
            if len(layouts) == 1:
                raise
            # NOTE: with both layouts, a cluster that fails to start must not lose the
            # emulated half of the run: the report says what failed.
            logger.exception("layout failed", extra={"layout": layout})
            failures.append({"layout": layout, "error": repr(exc)})
    if not rows:
        raise RuntimeError(f"no layout ran: {failures}")
    meta = report_meta(args, add_vs_single(rows), failures, hit)
    write_report(args.name, rows, meta, COLUMNS, plot)
    if hit:
        from rich.console import Console

        Console().print({"kv_hit_ttft": hit})
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    raise SystemExit(main())
