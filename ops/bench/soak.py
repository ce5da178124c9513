"""Soak: the app at 2× its capacity for a fixed time, on loopback. Does it fail closed and stay
flat?

    python -m ops bench soak [--minutes 10] [--overload 2.0]

One run against the real app (1 PE + 1 DE, API keys for two tenants):
1. Capacity X: closed-loop clients for 30 s (after a 5 s warm-up).
2. Soak: Poisson arrivals at `--overload` × X for `--minutes`, 20/50/30 % priority / default
   / flex, streamed `/v1/completions` with random 192-token prompts and 24 forced tokens.
   Every 5 s the RSS of each of the app's replica processes is sampled.
3. Then, with the load gone: every engine must be idle with all its KV blocks free (no
   leaked references) and the admission queue empty.

Pass criteria (the same `soak()` runs for 1 minute in `tests/integration/test_soak.py`):
- answers are 200, or refusals 429 / 503 / 408, each with `Retry-After`;
- priority p99 TTFT bounded (reported against the unloaded p99);
- each replica's RSS in the last tenth of the run within ±10 % of its level at 25–35 %;
- no leaked KV blocks and nothing left in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from app.auth import hash_key
from engine.config import ModelConfig, default_model_dir
from ops.bench import admission
from ops.bench._report import machine_info, write_report
from ops.bench._serve import deploy, serve_session
from ops.bench.admission import (
    KEYS,
    MODEL,
    TIERS,
    Job,
    measure_capacity,
    pct,
    run_phase,
    summarise,
)

logger = logging.getLogger(__name__)
APP = "dualpath-soak"
ALLOWED = admission.FAIL_CLOSED_STATUSES
# the admission benchmark's columns (the same `summarise` rows) less the queue median and PE
# times, plus the statuses outside ALLOWED
_UNREPORTED = {"queue_p50_s", "pe_p50_s", "pe_p99_s"}
COLUMNS = [c for c in admission.COLUMNS if c not in _UNREPORTED] + ["other_status"]


def app_config(model: Path, root: Path) -> dict[str, Any]:
    return {
        "name": APP,
        "model": {"path": str(model), "served_model_name": MODEL},
        "engine": {"kv_cache_bytes": "128MiB", "max_num_seqs": 32},
        "kvstore": {"path": str(root / "kv"), "dram_bytes": "32MiB"},
        "ingress": {"ledger_path": str(root / "usage.jsonl")},
        "audit": {"path": str(root / "audit")},
        "tracing": {"path": str(root / "traces")},
        "auth": {"tenants": [{"name": t, "key_sha256": [hash_key(k)]} for t, k in KEYS.items()]},
        "pricing": {"windows": {"rules": []}},
    }


class RSSSampler:
    """RSS of the app's replica processes (`ray::ServeReplica:<app>:…`) every `every_s`."""

    def __init__(self, app: str, every_s: float = 5.0):
        self.app, self.every_s = app, every_s
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.monotonic()

    def __enter__(self) -> RSSSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0 if not self.samples else self.every_s):
            rss: dict[str, int] = {}
            for proc in psutil.process_iter(["pid", "cmdline"]):
                title = " ".join(proc.info["cmdline"] or [])
                if f"ServeReplica:{self.app}:" in title:
                    name = title.split(f"ServeReplica:{self.app}:", 1)[1].split()[0]
                    try:
                        rss[name] = proc.memory_info().rss
                    except psutil.Error:
                        continue
            self.samples.append((time.monotonic() - self._t0, rss))

    def drift(self) -> dict[str, float]:
        """Per replica: mean RSS over the last tenth of the run / mean over 25–35 %, − 1."""
        end = self.samples[-1][0]
        out = {}
        for name in self.samples[-1][1]:
            early = [
                s[name] for t, s in self.samples if 0.25 * end <= t <= 0.35 * end and name in s
            ]
            late = [s[name] for t, s in self.samples if t >= 0.9 * end and name in s]
            if early and late:
                out[name] = statistics.mean(late) / statistics.mean(early) - 1
        return out


def idle_state(app: str, timeout_s: float = 30.0) -> dict[str, Any]:
    """Wait for the engines to report idle; returns what they and the ingress report."""
    from ray import serve

    scheduler = serve.get_deployment_handle("Scheduler", app)
    ingress = serve.get_app_handle(app)
    deadline = time.time() + timeout_s
    while True:
        engines = scheduler.engines.remote().result()
        busy = [e for e in engines if e.num_running or e.num_waiting]
        if not busy or time.time() > deadline:
            break
        time.sleep(0.5)
    time.sleep(1.0)  # one more report after the last request left
    engines = scheduler.engines.remote().result()
    flight = ingress.admission_stats.remote().result()["in_flight"]
    return {
        "engines": {
            e.replica_id[-8:]: {
                "role": e.role,
                "running": e.num_running,
                "waiting": e.num_waiting,
                "leaked_blocks": e.num_total_blocks - e.num_free_blocks,
            }
            for e in engines
        },
        "in_flight_requests": flight["requests"],
    }


def soak(
    base: str,
    minutes: float,
    overload: float,
    capacity: float,
    vocab: int,
    seed: int = 0,
    prompt_tokens: int = 192,
    max_tokens: int = 24,
) -> dict[str, Any]:
    """Run the soak against a deployed app; returns rows, RSS drift and the idle state."""
    rng = random.Random(seed)

    def prompt() -> list[int]:
        return [rng.randrange(100, vocab - 100) for _ in range(prompt_tokens)]

    unloaded = []
    for _ in range(5):
        job = Job(0.0, "priority", "t1", prompt())
        unloaded += asyncio.run(run_phase(base, [job], max_tokens, True, "unloaded"))
    reference = pct([r.ttft_s for r in unloaded if r.ttft_s], 0.99)
    rate, jobs, t = overload * capacity, [], 0.0
    while (t := t + rng.expovariate(rate)) < minutes * 60:
        tier = rng.choices(TIERS, (0.2, 0.5, 0.3))[0]
        jobs.append(Job(t, tier, rng.choice(list(KEYS)), prompt()))
    with RSSSampler(APP) as rss:
        results = asyncio.run(run_phase(base, jobs, max_tokens, True, "soak"))
    rows = summarise("unloaded", unloaded, None) + summarise("soak", results, reference)
    refused = [r for r in results if r.status != 200]
    return {
        "rows": rows,
        "capacity_req_s": capacity,
        "rate_req_s": rate,
        "statuses": sorted({r.status for r in results}),
        "refused_without_retry_after": sum(not r.retry_after for r in refused),
        "rss_drift": rss.drift(),
        "rss_samples": len(rss.samples),
        "idle": idle_state(APP),
    }


def check(result: dict[str, Any], rss_tolerance: float = 0.10) -> list[str]:
    """The pass criteria; returns what failed (empty: passed)."""
    failed = []
    if set(result["statuses"]) - ALLOWED:
        failed.append(f"statuses {result['statuses']} beyond {sorted(ALLOWED)}")
    if result["refused_without_retry_after"]:
        failed.append(f"{result['refused_without_retry_after']} refusals without Retry-After")
    drift = {k: v for k, v in result["rss_drift"].items() if abs(v) > rss_tolerance}
    if drift:
        failed.append(f"RSS not flat: {drift}")
    leaks = {
        k: e
        for k, e in result["idle"]["engines"].items()
        if any(e[f] for f in ("running", "waiting", "leaked_blocks"))
    }
    if leaks or result["idle"]["in_flight_requests"]:
        failed.append(f"left behind: {leaks}, in flight {result['idle']['in_flight_requests']}")
    return failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ops bench soak", description=__doc__)
    p.add_argument("--model", type=Path, default=default_model_dir())
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--overload", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    vocab = ModelConfig.from_dir(args.model).vocab_size
    with serve_session(num_cpus=2) as port:
        base = deploy(APP, app_config(args.model, root), port)
        rng = random.Random(args.seed + 1)
        prompts = [[rng.randrange(100, vocab - 100) for _ in range(192)] for _ in range(64)]
        capacity = asyncio.run(measure_capacity(base, prompts, 24))
        result = soak(base, args.minutes, args.overload, capacity, vocab, args.seed)
    failed = check(result)
    meta = {
        **machine_info(),
        "args": vars(args) | {"model": str(args.model)},
        **{k: v for k, v in result.items() if k != "rows"},
        "failed": failed,
    }
    write_report("soak", result["rows"], meta, COLUMNS)
    logger.info("soak %s", "passed" if not failed else "FAILED", extra={"failed": failed})
    return 1 if failed else 0
