"""Server-level peer comparison: our app against `llama-server` on the same GGUF, the same
CPU threads and the same closed-loop HTTP load.

    python -m ops bench serve-peer [--clients 1,8,32] [--prompt-tokens 128] [--max-tokens 64]
                                   [--requests-per-client 8] [--transport auto]

(`make bench-serve-peer`; builds llama.cpp once, several minutes, see ops/bench/_llamacpp.py.)

Sides, run one after the other, never at the same time (llama-server is stopped before Ray
and Serve start):
- llama.cpp: `llama-server -t 2 -tb 2 -np 32 --cont-batching` on the GGUF the app's model is
  converted from (`ops.model_fetch.default_gguf_path()`), RAM prompt cache off.
- ours: the app as `ops bench serve` deploys it (Ray + Serve here, 1 PrefillEngine + 1
  DecodeEngine on one node, one CPU and one torch thread each) with serve_config.yaml's engine
  section (int4 weights, bf16 activations and KV) and a fresh, empty KV store.
Both get 2 compute threads in total; ours also runs Ingress, Scheduler, TrafficManager and
Serve's proxy as Python processes beside them.

Load: for each `--clients` count, that many clients each send `--requests-per-client`
streamed /v1/completions requests, the next when the previous has finished. Each request is
a unique `--prompt-tokens` slice of real English (pydoc topics) as token ids, identical for
both sides, with `--max-tokens` outputs at temperature 0, EOS ignored, and llama.cpp told
`cache_prompt: false`, so neither side reuses a cached prefix. A request that does not
return exactly `--max-tokens` tokens fails the run.

Rows: per side and client count, TTFT p50/p90, TPOT p50 (time between the first and last
token / (tokens - 1)), output tok/s (all generated tokens / wall time of the closed loop);
our rows add ours/llama.cpp for output tok/s (> 1: we are faster) and TTFT p50 (< 1: we are
faster).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import httpx
import yaml

from engine.config import default_model_dir
from ops.bench._report import machine_info, write_report
from ops.bench._serve import deploy, serve_session

logger = logging.getLogger(__name__)
APP = "dualpath-peer-bench"
MODEL = "bench-model"
SERVE_CONFIG = Path(__file__).resolve().parents[2] / "serve_config.yaml"
LLAMACPP_THREADS = 2
LLAMACPP_SLOTS = 32
PROMPT_STRIDE = 97  # tokens between consecutive prompts' starts in the corpus
COLUMNS = [
    "impl",
    "threads",
    "clients",
    "requests",
    "ttft_p50_ms",
    "ttft_p90_ms",
    "tpot_p50_ms",
    "out_tok_per_s",
    "tok_s_vs_llamacpp",
    "ttft_p50_vs_llamacpp",
]


class Side(StrEnum):
    OURS = "dualpath"
    LLAMACPP = "llama.cpp"


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One streamed request, seconds from sending it."""

    ttft_s: float
    last_token_s: float
    num_tokens: int

    @property
    def tpot_s(self) -> float:
        return (self.last_token_s - self.ttft_s) / max(1, self.num_tokens - 1)


def build_prompts(corpus_ids: list[int], num_tokens: int, count: int) -> list[list[int]]:
    """`count` slices of `num_tokens` ids starting `PROMPT_STRIDE` tokens apart (as
    `ops bench serve` cuts them), so no two start alike and none is another's prefix."""
    span = len(corpus_ids) - num_tokens
    if count * PROMPT_STRIDE > span:
        raise ValueError(f"corpus too short for {count} prompts of {num_tokens} tokens")
    return [corpus_ids[i * PROMPT_STRIDE : i * PROMPT_STRIDE + num_tokens] for i in range(count)]


def request_body(side: Side, prompt_ids: list[int], max_tokens: int) -> dict[str, Any]:
    """The /v1/completions body for `side`: the same token ids, greedy, EOS ignored, streamed
    with a final usage chunk; llama.cpp is also told not to reuse a slot's cached prompt."""
    body: dict[str, Any] = {
        "prompt": prompt_ids,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if side is Side.OURS:
        body["model"] = MODEL
    else:
        body["cache_prompt"] = False
    return body


def parse_stream(events: list[tuple[float, dict[str, Any]]], max_tokens: int) -> RequestRecord:
    """A request's record from its SSE chunks, each with its arrival time in seconds.

    A token chunk is one with a choice carrying text or a finish reason (a leading empty
    chunk is not a token); the token count is the usage chunk's `completion_tokens`.

    Raises:
        ValueError: no token arrived, or the count is not `max_tokens` (EOS not ignored).
    """
    times = [
        t
        for t, chunk in events
        for c in chunk.get("choices") or ()
        if c.get("text") or c.get("finish_reason")
    ]
    usage = [chunk["usage"] for _, chunk in events if chunk.get("usage")]
    num_tokens = usage[-1]["completion_tokens"] if usage else 0
    if not times or num_tokens != max_tokens:
        raise ValueError(f"stream gave {num_tokens} tokens, expected {max_tokens}")
    return RequestRecord(ttft_s=times[0], last_token_s=times[-1], num_tokens=num_tokens)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (`q` in [0, 1]) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summarise(
    side: Side,
    threads: str,
    workload: str,
    clients: int,
    records: list[RequestRecord],
    wall_s: float,
) -> dict[str, Any]:
    """One table row from a closed loop's per-request records and its wall time."""
    ttfts = [r.ttft_s for r in records]
    num_tokens = sum(r.num_tokens for r in records)
    return {
        "impl": str(side),
        "threads": threads,
        "workload": workload,
        "clients": clients,
        "requests": len(records),
        "ttft_p50_ms": percentile(ttfts, 0.5) * 1e3,
        "ttft_p90_ms": percentile(ttfts, 0.9) * 1e3,
        "tpot_p50_ms": percentile([r.tpot_s for r in records], 0.5) * 1e3,
        "out_tok_per_s": num_tokens / wall_s,
        "num_out_tokens": num_tokens,
        "wall_s": wall_s,
    }


def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`rows` with ours/llama.cpp output tok/s and TTFT p50 on each of our rows that has a
    llama.cpp row at the same client count."""
    peer = {r["clients"]: r for r in rows if r["impl"] == Side.LLAMACPP}
    out = []
    for row in rows:
        other = peer.get(row["clients"])
        if row["impl"] == Side.OURS and other is not None:
            row = row | {
                "tok_s_vs_llamacpp": row["out_tok_per_s"] / other["out_tok_per_s"],
                "ttft_p50_vs_llamacpp": row["ttft_p50_ms"] / other["ttft_p50_ms"],
            }
        out.append(row)
    return out


async def _stream(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> RequestRecord:
    events: list[tuple[float, dict[str, Any]]] = []
    start = time.perf_counter()
    async with http.stream("POST", url, json=body) as r:
        if r.is_error:
            await r.aread()
            raise RuntimeError(f"{url} answered {r.status_code}: {r.text[:500]}")
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append((time.perf_counter() - start, json.loads(line[6:])))
    return parse_stream(events, body["max_tokens"])


async def _closed_loop(
    url: str, side: Side, prompts: list[list[int]], clients: int, max_tokens: int
) -> tuple[list[RequestRecord], float]:
    """`clients` clients share `prompts`, each sending its next when its previous is done."""
    # NOTE: no keep-alive, for both sides: llama-server (cpp-httplib) closes a connection
    # after a few requests, and a reused one then fails with "Server disconnected". A new
    # localhost connection per request costs well under a millisecond.
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:

        async def client(mine: list[list[int]]) -> list[RequestRecord]:
            return [await _stream(http, url, request_body(side, p, max_tokens)) for p in mine]

        start = time.perf_counter()
        per_client = await asyncio.gather(*(client(prompts[i::clients]) for i in range(clients)))
        wall_s = time.perf_counter() - start
    return [r for records in per_client for r in records], wall_s


def _run_side(
    url: str, side: Side, threads: str, args: argparse.Namespace, prompts: list[list[int]]
) -> list[dict[str, Any]]:
    """Warm-up (one request per client at the largest count, not measured), then one closed
    loop per client count on the next prompts of `prompts` (the same ones for each side)."""
    warmup_n = max(args.clients)
    asyncio.run(_closed_loop(url, side, prompts[:warmup_n], warmup_n, min(4, args.max_tokens)))
    rows, used = [], warmup_n
    workload = f"{args.prompt_tokens}+{args.max_tokens} tok"
    for clients in args.clients:
        n = clients * args.requests_per_client
        records, wall_s = asyncio.run(
            _closed_loop(url, side, prompts[used : used + n], clients, args.max_tokens)
        )
        used += n
        row = summarise(side, threads, workload, clients, records, wall_s)
        logger.info("bench row", extra=row)
        rows.append(row)
    return rows


def _same_text(url: str, tokenizer: Any, prompt_ids: list[int]) -> bool:
    """True when llama-server's vocabulary turns `prompt_ids` into the text ours does."""
    r = httpx.post(f"{url}/detokenize", json={"tokens": prompt_ids}, timeout=30)
    r.raise_for_status()
    return r.json()["content"] == tokenizer.decode(prompt_ids)


def _bench_llamacpp(args: argparse.Namespace, prompts: list[list[int]], tokenizer: Any):
    from ops.bench._llamacpp import ensure_llamacpp, llama_server
    from ops.model_fetch import default_gguf_path

    slots = max(LLAMACPP_SLOTS, *args.clients)
    threads = f"-t {LLAMACPP_THREADS}"
    server = llama_server(
        ensure_llamacpp(),
        args.gguf or default_gguf_path(),
        threads=LLAMACPP_THREADS,
        parallel=slots,
        extra_args=("--cache-ram", "0"),
    )
    with server as base_url:
        same_text = _same_text(base_url, tokenizer, prompts[0])
        if not same_text:
            logger.warning("llama.cpp decodes the prompt ids to other text than ours")
        rows = _run_side(f"{base_url}/v1/completions", Side.LLAMACPP, threads, args, prompts)
    return rows, same_text


def _bench_ours(args: argparse.Namespace, prompts: list[list[int]]):
    engine = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]["args"]["engine"]
    with tempfile.TemporaryDirectory(prefix="peer-kvstore-") as kv_dir:
        app_args = {
            "model": {"path": str(args.model), "served_model_name": MODEL},
            "engine": engine,
            "transfer": {"transport": args.transport},
            "kvstore": {"path": kv_dir},  # empty: no KV persisted by an earlier run to hit
        }
        with serve_session(num_cpus=2) as port:
            url = f"{deploy(APP, app_args, port)}/v1/completions"
            rows = _run_side(url, Side.OURS, "1 PE + 1 DE", args, prompts)
    return rows, engine


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    titles = ["TTFT p50 (ms)", "TPOT p50 (ms)", "output tok/s"]
    for side in Side:
        mine = [r for r in rows if r["impl"] == side]
        xs = [r["clients"] for r in mine]
        for ax, key in zip(axes, ["ttft_p50_ms", "tpot_p50_ms", "out_tok_per_s"], strict=True):
            ax.plot(xs, [r[key] for r in mine], marker="o", label=f"{side} ({mine[0]['threads']})")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("closed-loop clients")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle("same GGUF, 2 threads each side, streamed /v1/completions")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ops bench serve-peer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", type=Path, default=default_model_dir())
    p.add_argument("--gguf", type=Path, default=None, help="default: the app model's GGUF")
    p.add_argument("--transport", default="auto", help="our PE→DE KV transport")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--requests-per-client", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--name", default="serve-peer")
    args = p.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(",")]

    from pydoc_data.topics import topics

    from engine.tokenizer import Tokenizer

    tokenizer = Tokenizer(args.model)
    corpus_ids = tokenizer.encode(" ".join(v for _, v in sorted(topics.items())))
    num_prompts = max(args.clients) + sum(args.clients) * args.requests_per_client
    prompts = build_prompts(corpus_ids, args.prompt_tokens, num_prompts)

    llama_rows, same_text = _bench_llamacpp(args, prompts, tokenizer)
    our_rows, engine = _bench_ours(args, prompts)
    meta = {
        **machine_info(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "layout": "one machine, one server at a time. llama.cpp: llama-server -t 2 -tb 2 "
        f"-np {max(LLAMACPP_SLOTS, *args.clients)} --cont-batching, --cache-ram 0, "
        "cache_prompt false. ours: 1 PrefillEngine + 1 DecodeEngine replica, 1 CPU and 1 torch "
        "thread each, plus Ingress/Scheduler/TrafficManager/proxy processes; empty KV store",
        "our_engine": engine,
        "prompt_text_identical": same_text,
    }
    print(f"threads: {meta['layout']}")
    write_report(args.name, add_ratios(llama_rows + our_rows), meta, COLUMNS, _plot)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    raise SystemExit(main())
