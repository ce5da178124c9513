"""`python -m ops replay <trace-file>`: replay a recorded or generated workload against a
running app, at its recorded pace, and report what the clients saw.

A trace file is JSON lines, one request each:

    {"t": 0.0, "session": "a1", "prompt_tokens": 2048, "max_tokens": 64,
     "service_tier": "default", "append_tokens": 0}

`t` is seconds from the start. Requests of one `session` run in order, each after the
previous one finished: a turn's prompt is the previous prompt + what the model generated +
`append_tokens` new tokens (an agent's next turn; prefix reuse is real). A request without a
session stands alone with `prompt_tokens` tokens. Token ids are random regular-vocabulary
ids and generation is forced (`ignore_eos`), so lengths, not content, shape the load.

The audit log (`audit-YYYY-MM-DD.jsonl`) is also a trace file: its successful lines replay
with their recorded lengths, tiers and pace. `--make-agentic` writes an agentic trace with
the simulator's generator (ops/sim/traces.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table
from tqdm import tqdm

VOCAB = (200, 48999)  # regular-vocabulary ids of the default model


@dataclass
class Request:
    t: float
    session: str | None
    prompt_tokens: int
    max_tokens: int
    service_tier: str | None = None
    append_tokens: int = 0


@dataclass
class Result:
    session: str | None
    tier: str
    status: int
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    request_id: str = ""
    error: str | None = None
    ids: list[int] = field(default_factory=list)


def load_trace(path: Path) -> list[Request]:
    """Requests of a trace file or an audit log (successful lines only), by time."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    requests = []
    if rows and "route" in rows[0] and "status" in rows[0]:  # an audit log
        ok = [r for r in rows if r["status"] == "ok" and r.get("completion_tokens", 0) > 0]
        t0 = min((r["time"] for r in ok), default=0.0)
        for r in ok:
            requests.append(
                Request(
                    r["time"] - t0,
                    None,
                    max(1, r["prompt_tokens"]),
                    r["completion_tokens"],
                    r.get("service_tier"),
                )
            )
    else:
        for r in rows:
            requests.append(
                Request(
                    float(r.get("t", 0.0)),
                    r.get("session"),
                    int(r.get("prompt_tokens", 0)),
                    int(r["max_tokens"]),
                    r.get("service_tier"),
                    int(r.get("append_tokens", 0)),
                )
            )
    return sorted(requests, key=lambda r: r.t)


def make_agentic(
    path: Path, agents: int, turns: int, context: int, append: int, gen: int, rate: float, seed: int
) -> int:
    """An agentic trace (the simulator's generator): agents start as a Poisson process."""
    from ops.sim.traces import make_trace

    spec = argparse.Namespace(
        seed=seed, agents=agents, turns=turns, context=context, append=append, gen=gen
    )
    rng = random.Random(seed)
    t, lines = 0.0, []
    for i, agent in enumerate(make_trace(spec, VOCAB[1] + 1)):
        for turn, (extra, out) in enumerate(zip(agent.appends, agent.gens, strict=True)):
            first = turn == 0
            lines.append(
                {
                    "t": round(t, 3),
                    "session": f"agent-{i}",
                    "prompt_tokens": len(agent.context) + len(extra) if first else 0,
                    "append_tokens": 0 if first else len(extra),
                    "max_tokens": out,
                }
            )
        t += rng.expovariate(rate)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return len(lines)


async def _send(
    http: httpx.AsyncClient, url: str, model: str, request: Request, prompt: list[int]
) -> Result:
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": request.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "return_token_ids": True,
        "stream_options": {"include_usage": True},
    }
    if request.service_tier:
        body["service_tier"] = request.service_tier
    result = Result(
        request.session, request.service_tier or "default", 0, prompt_tokens=len(prompt)
    )
    start = time.perf_counter()
    first = last = None
    try:
        async with http.stream("POST", url, json=body) as response:
            result.status = response.status_code
            result.request_id = response.headers.get("x-request-id", "")
            if response.status_code != 200:
                result.error = (await response.aread()).decode(errors="replace")[:200]
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = str(chunk["error"])[:200]
                    continue
                for choice in chunk.get("choices", []):
                    if choice.get("token_ids"):
                        last = time.perf_counter()
                        first = first or last
                        result.ids += choice["token_ids"]
                usage = chunk.get("usage") or {}
                details = usage.get("prompt_tokens_details") or {}
                result.cached_tokens = details.get("cached_tokens", result.cached_tokens)
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.e2e_s = time.perf_counter() - start
    if first is not None and last is not None:
        result.ttft_s = first - start
        n = len(result.ids)
        result.tpot_s = (last - first) / (n - 1) if n > 1 else None
    return result


async def replay(
    url: str, model: str, requests: list[Request], speed: float, api_key: str | None, seed: int
) -> tuple[list[Result], float]:
    rng = random.Random(seed)
    sessions: dict[str | None, list[Request]] = defaultdict(list)
    alone: list[Request] = []
    for r in requests:
        (sessions[r.session] if r.session else alone).append(r)
    results: list[Result] = []
    bar = tqdm(total=len(requests), desc="replay", unit="req")
    t0 = time.perf_counter()

    def tokens(n: int) -> list[int]:
        return [rng.randint(*VOCAB) for _ in range(n)]

    async def at(t: float) -> None:
        await asyncio.sleep(max(0.0, t / speed - (time.perf_counter() - t0)))

    async def one(http: httpx.AsyncClient, r: Request) -> None:
        await at(r.t)
        results.append(await _send(http, url, model, r, tokens(max(1, r.prompt_tokens))))
        bar.update(1)

    async def session(http: httpx.AsyncClient, turns: list[Request]) -> None:
        prompt: list[int] = []
        for r in turns:
            await at(r.t)
            prompt = prompt + tokens(r.append_tokens) if prompt else tokens(max(1, r.prompt_tokens))
            result = await _send(http, url, model, r, prompt)
            results.append(result)
            bar.update(1)
            # a refused turn leaves the agent without a reply: its next turn starts afresh
            prompt = prompt + result.ids if result.status == 200 else []

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=900, headers=headers) as http:
        await asyncio.gather(
            *(one(http, r) for r in alone), *(session(http, t) for t in sessions.values())
        )
    bar.close()
    return results, time.perf_counter() - t0


def summarize(results: list[Result], wall_s: float) -> dict[str, Any]:
    def pct(values: list[float], q: float) -> float | None:
        values = sorted(values)
        return values[min(len(values) - 1, int(q * len(values)))] if values else None

    tiers: dict[str, Any] = {}
    for tier in sorted({r.tier for r in results}):
        mine = [r for r in results if r.tier == tier]
        ok = [r for r in mine if r.status == 200 and r.error is None]
        ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
        tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
        statuses: dict[str, int] = defaultdict(int)
        for r in mine:
            statuses[str(r.status) if r.error is None or r.status != 200 else "stream-error"] += 1
        tiers[tier] = {
            "requests": len(mine),
            "statuses": dict(statuses),
            "ttft_p50_s": pct(ttft, 0.5),
            "ttft_p99_s": pct(ttft, 0.99),
            "tpot_p50_s": pct(tpot, 0.5),
            "e2e_p50_s": pct([r.e2e_s for r in ok], 0.5),
            "cached_fraction": sum(r.cached_tokens for r in ok)
            / max(1, sum(r.prompt_tokens for r in ok)),
        }
    return {"wall_s": wall_s, "requests": len(results), "tiers": tiers}


def _print(summary: dict[str, Any], console: Console) -> None:
    table = Table(title=f"replay: {summary['requests']} requests in {summary['wall_s']:.1f} s")
    for col in (
        "tier",
        "requests",
        "statuses",
        "TTFT p50",
        "TTFT p99",
        "TPOT p50",
        "E2E p50",
        "cached",
    ):
        table.add_column(col)

    def s(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}s"

    for tier, row in summary["tiers"].items():
        table.add_row(
            tier,
            str(row["requests"]),
            " ".join(f"{k}:{v}" for k, v in sorted(row["statuses"].items())),
            s(row["ttft_p50_s"]),
            s(row["ttft_p99_s"]),
            s(row["tpot_p50_s"]),
            s(row["e2e_p50_s"]),
            f"{row['cached_fraction']:.0%}",
        )
    console.print(table)


def _cmd_replay(args: argparse.Namespace) -> int:
    console = Console()
    path = Path(args.trace_file)
    if args.make_agentic:
        n = make_agentic(
            path, args.agents, args.turns, args.context, args.append, args.gen, args.rate, args.seed
        )
        console.print(f"wrote {n} requests to {path}")
        return 0
    requests = load_trace(path)[: args.limit or None]
    if not requests:
        console.print(f"[red]{path} has no requests to replay[/]")
        return 1
    url = args.url.rstrip("/") + "/v1/completions"
    results, wall = asyncio.run(
        replay(url, args.model, requests, args.speed, args.api_key, args.seed)
    )
    summary = summarize(results, wall)
    _print(summary, console)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = [{k: v for k, v in vars(r).items() if k != "ids"} for r in results]
    out.write_text(json.dumps({"trace": str(path), "summary": summary, "results": rows}, indent=1))
    console.print(f"results: {out}")
    failed = sum(1 for r in results if r.status >= 500 or r.status == 0)
    return 1 if failed else 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", help="replay a workload trace (or an audit log) against the app")
    p.add_argument(
        "trace_file",
        help="JSON-lines trace, an audit-*.jsonl file, or (with --make-agentic) the file to write",
    )
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the app's base URL")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--api-key", default=None)
    p.add_argument("--speed", type=float, default=1.0, help="2 = twice the recorded pace")
    p.add_argument("--limit", type=int, default=0, help="replay only the first N requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-results/replay.json")
    gen = p.add_argument_group("--make-agentic: write an agentic trace instead of replaying")
    gen.add_argument("--make-agentic", action="store_true")
    gen.add_argument("--agents", type=int, default=4)
    gen.add_argument("--turns", type=int, default=3)
    gen.add_argument("--context", type=int, default=1024)
    gen.add_argument("--append", type=int, default=128)
    gen.add_argument("--gen", type=int, default=32)
    gen.add_argument("--rate", type=float, default=0.5, help="agents started per second")
    p.set_defaults(func=_cmd_replay)
