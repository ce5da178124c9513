"""Serve benchmark: TTFT, TPOT and throughput through HTTP at 1/4/16 concurrent clients, and
the orchestration overhead on TTFT, for each KV transport, in one run.

    python -m ops bench serve [--transports nixl,object_store] [--clients 1,4,16]

The app runs as in production (Ray + Serve in this machine, 1 PE + 1 DE, one CPU each).
Every request is a streamed /v1/completions call with a unique --prompt-tokens prompt
(token ids, so nothing hits the prefix cache) and --max-tokens outputs (EOS ignored).

Overhead: the engine alone (in this process, one thread like a PE replica, prefix caching
off) runs the same kind of prompt to its first token, interleaved with the 1-client HTTP
requests; overhead = HTTP TTFT p50 − engine TTFT p50 (target ≤ 20 ms on CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from engine import EngineConfig, EngineCore, EngineRequest, SamplingParams
from engine.config import default_model_dir
from ops.bench._report import machine_info, write_report
from ops.bench._serve import deploy, serve_session

logger = logging.getLogger(__name__)
APP = "dualpath-bench"
MODEL = "bench-model"
OVERHEAD_TARGET_MS = 20.0
COLUMNS = [
    "workload",
    "impl",
    "clients",
    "requests",
    "ttft_p50_ms",
    "ttft_p90_ms",
    "tpot_p50_ms",
    "req_per_s",
    "out_tok_per_s",
    "overhead_ms",
    "ttft_vs_alone_ms",
    "target",
    "status",
]


class Prompts:
    """Unique token-id prompts cut from a real English corpus (pydoc topics)."""

    def __init__(self, engine: EngineCore, num_tokens: int):
        from pydoc_data.topics import topics

        text = " ".join(v for _, v in sorted(topics.items()))
        self.ids = engine.tokenizer.encode(text)
        self.num_tokens = num_tokens
        self.next = 0

    def take(self) -> list[int]:
        start = (self.next * 97) % (len(self.ids) - self.num_tokens)
        self.next += 1
        return self.ids[start : start + self.num_tokens]


async def _stream_one(http: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int):
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = last = prefill_ms = None
    tokens = 0
    async with http.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("choices"):
                if first is None:
                    first = now
                last = now
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                prefill_ms = (chunk.get("timings") or {}).get("prefill_ms")
    assert first is not None and last is not None and tokens == max_tokens, (tokens, max_tokens)
    ttft = first - start
    return {
        "ttft": ttft,
        "tpot": (last - first) / max(1, tokens - 1),
        "e2e": last - start,
        "tokens": tokens,
        # everything in TTFT that is not the PE's engine time for this very request
        "overhead": None if prefill_ms is None else ttft - prefill_ms / 1e3,
    }


async def _run_clients(url: str, prompts: list[list[int]], clients: int, max_tokens: int):
    per_client = [prompts[i::clients] for i in range(clients)]
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:

        async def client(mine: list[list[int]]):
            return [await _stream_one(http, url, p, max_tokens) for p in mine]

        start = time.perf_counter()
        results = await asyncio.gather(*(client(m) for m in per_client))
        wall = time.perf_counter() - start
    return [r for rs in results for r in rs], wall


def _engine_ttft(engine: EngineCore, prompt: list[int]) -> float:
    start = time.perf_counter()
    engine.add_request(EngineRequest("ttft", prompt, SamplingParams(temperature=0, max_tokens=1)))
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - start


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def _deploy(transport: str, model_dir: Path, port: int) -> str:
    args = {
        "model": {"path": str(model_dir), "served_model_name": MODEL},
        "engine": {"kv_cache_bytes": "128MiB"},
        "transfer": {"transport": transport},
    }
    return f"{deploy(APP, args, port)}/v1/completions"


def bench_transport(args, transport: str, engine: EngineCore, prompts: Prompts, port: int):
    url = _deploy(transport, args.model, port)
    asyncio.run(_run_clients(url, [prompts.take() for _ in range(3)], 1, 4))  # warm-up
    rows: list[dict[str, Any]] = []
    # 1 client, interleaved with the engine-alone baseline on fresh prompts of the same size
    http_ttft, engine_ttft, singles = [], [], []
    for _ in tqdm(range(args.overhead_samples), desc=f"{transport}: overhead", unit="req"):
        engine_ttft.append(_engine_ttft(engine, prompts.take()))
        (result,), _ = asyncio.run(_run_clients(url, [prompts.take()], 1, args.max_tokens))
        http_ttft.append(result["ttft"])
        singles.append(result)
    vs_alone_ms = (statistics.median(http_ttft) - statistics.median(engine_ttft)) * 1e3
    rows.append(
        {
            "workload": f"ttft {args.prompt_tokens} tok",
            "impl": "engine alone (1 thread)",
            "clients": 1,
            "requests": len(engine_ttft),
            "ttft_p50_ms": statistics.median(engine_ttft) * 1e3,
            "ttft_p90_ms": _pct(engine_ttft, 0.9) * 1e3,
        }
    )
    for clients in args.clients:
        n = max(clients * args.requests_per_client, 1)
        results, wall = asyncio.run(
            _run_clients(url, [prompts.take() for _ in range(n)], clients, args.max_tokens)
        )
        if clients == 1:
            results = results + singles
            wall = wall * len(results) / n  # same per-request pace, more samples
        row = {
            "workload": f"http {args.prompt_tokens}+{args.max_tokens} tok",
            "impl": f"serve/{transport}",
            "clients": clients,
            "requests": len(results),
            "ttft_p50_ms": _pct([r["ttft"] for r in results], 0.5) * 1e3,
            "ttft_p90_ms": _pct([r["ttft"] for r in results], 0.9) * 1e3,
            "tpot_p50_ms": _pct([r["tpot"] for r in results], 0.5) * 1e3,
            "req_per_s": len(results) / wall,
            "out_tok_per_s": sum(r["tokens"] for r in results) / wall,
        }
        overheads = [r["overhead"] for r in results if r["overhead"] is not None]
        if overheads:
            row["overhead_ms"] = _pct(overheads, 0.5) * 1e3
        if clients == 1:
            row["ttft_vs_alone_ms"] = vs_alone_ms
            row["target"] = f"overhead <= {OVERHEAD_TARGET_MS:.0f} ms"
            row["status"] = "ok" if row["overhead_ms"] <= OVERHEAD_TARGET_MS else "MISS"
        rows.append(row)
        logger.info("bench row", extra=row)
    return rows


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for impl in sorted({r["impl"] for r in rows if r["impl"].startswith("serve/")}):
        mine = [r for r in rows if r["impl"] == impl]
        xs = [r["clients"] for r in mine]
        axes[0].plot(xs, [r["ttft_p50_ms"] for r in mine], marker="o", label=impl)
        axes[1].plot(xs, [r["tpot_p50_ms"] for r in mine], marker="o", label=impl)
        axes[2].plot(xs, [r["out_tok_per_s"] for r in mine], marker="o", label=impl)
    base = [r for r in rows if r["impl"].startswith("engine alone")]
    if base:
        axes[0].axhline(base[0]["ttft_p50_ms"], color="gray", ls="--", label="engine alone")
    for ax, title in zip(axes, ["TTFT p50 (ms)", "TPOT p50 (ms)", "output tok/s"], strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ops bench serve", description=__doc__)
    p.add_argument("--model", type=Path, default=default_model_dir())
    p.add_argument("--transports", default="nixl,object_store")
    p.add_argument("--clients", default="1,4,16")
    p.add_argument("--requests-per-client", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--overhead-samples", type=int, default=12)
    p.add_argument("--name", default="serve")
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]

    engine = EngineCore(
        EngineConfig(
            model=args.model, num_threads=1, enable_prefix_caching=False, kv_cache_bytes=64 << 20
        )
    )
    prompts = Prompts(engine, args.prompt_tokens)
    rows: list[dict[str, Any]] = []
    with serve_session(num_cpus=2) as port:
        for transport in args.transports.split(","):
            rows += bench_transport(args, transport, engine, prompts, port)
    meta = {
        **machine_info(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "layout": "one machine: 1 PrefillEngine + 1 DecodeEngine replica, 1 CPU each",
    }
    write_report(args.name, rows, meta, COLUMNS, _plot)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    raise SystemExit(main())
