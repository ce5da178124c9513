"""What tracing costs: the same HTTP load with tracing off and on (every request traced,
file exporter), side by side in one run.

    python -m ops bench tracing [--single 16] [--clients 8] [--per-client 3]

The app as in production (1 PE + 1 DE, one CPU each); streamed /v1/completions with unique
256-token prompts and 32 forced output tokens. Per mode: `--single` requests one at a time
(TTFT, TPOT), then `--clients` concurrent clients (throughput). Modes run off → on → off
(the two `off` runs bound the drift of this shared machine); ratios are on / mean(off).
Also reported: spans and bytes the file exporter wrote per request.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from engine.config import default_model_dir
from engine.tokenizer import Tokenizer
from ops.bench._report import machine_info, write_report
from ops.bench._serve import deploy, serve_session
from ops.bench.serve import MODEL, Prompts, _pct, _run_clients

logger = logging.getLogger(__name__)
APP = "dualpath-tracing"
COLUMNS = [
    "mode",
    "requests",
    "ttft_p50_ms",
    "ttft_p90_ms",
    "tpot_p50_ms",
    "req_per_s",
    "ttft_ratio",
    "tpot_ratio",
    "throughput_ratio",
    "spans_per_req",
    "span_bytes_per_req",
]


def run_mode(args, mode: str, prompts: Prompts, port: int, traces: Path) -> dict[str, Any]:
    config = {
        "model": {"path": str(args.model), "served_model_name": MODEL},
        "engine": {"kv_cache_bytes": "128MiB"},
        "ingress": {"ledger_path": None},
        "audit": {"path": str(traces.parent / "audit")},
        "tracing": {"enabled": mode == "on", "path": str(traces)},
    }
    url = f"{deploy(APP, config, port)}/v1/completions"
    asyncio.run(_run_clients(url, [prompts.take() for _ in range(3)], 1, 4))  # warm-up
    before = _span_files(traces)
    singles, _ = asyncio.run(
        _run_clients(url, [prompts.take() for _ in range(args.single)], 1, args.max_tokens)
    )
    n = args.clients * args.per_client
    batch, wall = asyncio.run(
        _run_clients(url, [prompts.take() for _ in range(n)], args.clients, args.max_tokens)
    )
    asyncio.run(asyncio.sleep(2))  # the exporters' last batch
    spans, size = (a - b for a, b in zip(_span_files(traces), before, strict=True))
    requests = args.single + n
    return {
        "mode": mode,
        "requests": requests,
        "ttft_p50_ms": _pct([r["ttft"] for r in singles], 0.5) * 1e3,
        "ttft_p90_ms": _pct([r["ttft"] for r in singles], 0.9) * 1e3,
        "tpot_p50_ms": _pct([r["tpot"] for r in singles], 0.5) * 1e3,
        "req_per_s": len(batch) / wall,
        "spans_per_req": spans / requests,
        "span_bytes_per_req": size / requests,
    }


def _span_files(directory: Path) -> tuple[int, int]:
    lines = size = 0
    for path in directory.glob("spans-*.jsonl"):
        data = path.read_bytes()
        lines += data.count(b"\n")
        size += len(data)
    return lines, size


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ops bench tracing", description=__doc__)
    p.add_argument("--model", type=Path, default=default_model_dir())
    p.add_argument("--single", type=int, default=16)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--per-client", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args(argv)

    prompts = Prompts(SimpleNamespace(tokenizer=Tokenizer(args.model)), args.prompt_tokens)
    traces = Path(tempfile.mkdtemp(prefix="bench-tracing-")) / "traces"
    traces.mkdir()
    rows = []
    with serve_session(num_cpus=2) as port:
        for mode in ("off", "on", "off"):
            rows.append(run_mode(args, mode, prompts, port, traces))
            logger.info("bench row", extra=rows[-1])
    off = [r for r in rows if r["mode"] == "off"]
    for row in rows:
        for key, col in (
            ("ttft_p50_ms", "ttft_ratio"),
            ("tpot_p50_ms", "tpot_ratio"),
            ("req_per_s", "throughput_ratio"),
        ):
            row[col] = row[key] / statistics.mean(r[key] for r in off)
    meta = {**machine_info(), "args": {k: str(v) for k, v in vars(args).items()}}
    write_report("tracing", rows, meta, COLUMNS)
    return 0
