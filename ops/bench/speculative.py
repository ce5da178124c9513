"""Speculative decoding: TPOT with drafts (ngram, suffix) vs without, and whether greedy
outputs stay token-identical, on a code-edit trace (text to copy) and a control trace.

    python -m ops bench speculative [--batch-sizes 1,4,8,32] [--methods off,ngram,suffix]

One EngineCore per method in this process (the int4 engine of `ops bench engine` by
default, prefix cache off), built once, warmed up and reused. Traces are in
ops/bench/_spec_traces.py. Per cell (trace x batch size B): B distinct requests submitted
together and run to completion (greedy, EOS honoured), in waves until at least
`--min-requests` ran (batch 1: one after another). Methods are interleaved inside each cell,
their order rotating every repeat, so drift on the machine hits each alike; numbers are the
median over `--repeats`.

Per request, from the time each step's outputs come back: TTFT (from submission) and
TPOT = (last token - first token) / (tokens - 1). A cell reports the median TPOT and TTFT
over its requests, output tokens/s (all output tokens / the batch's wall time), the
drafts' acceptance rate and mean accepted length (`EngineCore.spec_stats` deltas, summed
over repeats), and `identical`: every request's token ids equal the `off` run's of the same
repeat. Each run is its own tenant, so the suffix drafter never sees an earlier repeat's
(identical) outputs.

Targets (reported, never failing the run): code-edit at batch 1, TPOT >= 1.8x lower than
off with all outputs identical; control, <= 5 % slower than off at every batch size.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from tqdm import tqdm

from engine import EngineConfig, EngineCore, EngineRequest, SamplingParams
from engine.config import SpeculativeConfig, default_model_dir
from engine.tokenizer import Tokenizer
from ops.bench._report import RESULTS_DIR, machine_info, write_report
from ops.bench._spec_traces import TRACES, take
from ops.bench.engine import IMPLS

logger = logging.getLogger(__name__)

COLUMNS = ["workload", "method", "tpot_ms", "ttft_ms", "tokens_per_s", "vs_off"]
COLUMNS += ["acceptance", "mean_len", "identical", "target", "status", "spread"]
METHODS = ("off", "ngram", "suffix")
CODE_EDIT_SPEEDUP = 1.8  # code-edit, batch 1: TPOT off / TPOT method
CONTROL_SLOWDOWN = 1.05  # control, every batch: TPOT method / TPOT off
WARMUP_TOKENS = 8


@dataclass(slots=True)
class RequestTiming:
    """One request's output token ids and when they came back."""

    submitted_s: float
    token_ids: list[int] = field(default_factory=list)
    first_s: float | None = None
    last_s: float | None = None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_s is None else self.first_s - self.submitted_s

    @property
    def tpot_s(self) -> float | None:
        if self.first_s is None or self.last_s is None or len(self.token_ids) < 2:
            return None
        return (self.last_s - self.first_s) / (len(self.token_ids) - 1)


@dataclass(slots=True)
class BatchRun:
    """One method's run of one cell: per-request timings, wall time, spec_stats deltas."""

    requests: list[RequestTiming]
    wall_s: float
    spec_counts: tuple[int, int, int, int]  # drafted, accepted, verify steps, emitted

    @property
    def tpot_s(self) -> float | None:
        values = [r.tpot_s for r in self.requests if r.tpot_s is not None]
        return statistics.median(values) if values else None

    @property
    def ttft_s(self) -> float:
        return statistics.median(r.ttft_s for r in self.requests if r.ttft_s is not None)

    @property
    def tokens_per_s(self) -> float:
        return sum(len(r.token_ids) for r in self.requests) / self.wall_s


def _spec_counts(core: EngineCore) -> tuple[int, int, int, int]:
    s = core.spec_stats
    return (s.drafted_tokens, s.accepted_tokens, s.verify_steps, s.emitted_tokens)


def run_batch(
    core: EngineCore, prompts: list[list[int]], batch_size: int, max_tokens: int, tenant: str
) -> BatchRun:
    """Run `prompts` in waves of `batch_size` (each wave submitted together, run to
    completion), stepping the engine here and timestamping each step's outputs."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    before = _spec_counts(core)
    timings: list[RequestTiming] = []
    started = time.perf_counter()
    for start in range(0, len(prompts), batch_size):
        wave: dict[str, RequestTiming] = {}
        for i, prompt in enumerate(prompts[start : start + batch_size], start):
            rid = f"{tenant}-{i}"
            wave[rid] = RequestTiming(time.perf_counter())
            core.add_request(EngineRequest(rid, prompt, params, tenant_salt=tenant.encode()))
        while core.has_unfinished():
            outputs = core.step()
            now = time.perf_counter()
            for out in outputs:
                timing = wave[out.request_id]
                if out.new_token_ids:
                    timing.token_ids.extend(out.new_token_ids)
                    if timing.first_s is None:
                        timing.first_s = now
                    timing.last_s = now
        timings.extend(wave.values())
    wall_s = time.perf_counter() - started
    after = _spec_counts(core)
    drafted, accepted, verify_steps, emitted = (a - b for a, b in zip(after, before, strict=True))
    return BatchRun(timings, wall_s, (drafted, accepted, verify_steps, emitted))


def build_engines(args: argparse.Namespace, num_kv_blocks: int) -> dict[str, EngineCore]:
    """One engine per method, identical but for `speculative.method`."""
    return {
        method: EngineCore(
            EngineConfig(
                model=args.model,
                **IMPLS[args.impl],
                num_threads=args.threads,
                max_num_seqs=max(args.batch_sizes),
                num_kv_blocks=num_kv_blocks,
                enable_prefix_caching=False,
                speculative=SpeculativeConfig(
                    method=method,
                    num_speculative_tokens=args.num_speculative_tokens,
                    adaptive=args.adaptive,
                    **args.spec_args,
                ),
            )
        )
        for method in tqdm(args.methods, desc="load engines")
    }


def _num_requests(batch_size: int, min_requests: int) -> int:
    """Requests a cell runs: whole waves of `batch_size`, at least `min_requests`."""
    return batch_size * math.ceil(min_requests / batch_size)


def _kv_blocks(prompts: list[list[int]], max_tokens: int, block_size: int = 64) -> int:
    """Blocks for the largest batch: every prompt + its reply + a full draft, with slack."""
    per_seq = [math.ceil((len(p) + max_tokens + 33) / block_size) for p in prompts]
    return sum(per_seq) + len(per_seq) + 16


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    torch.set_num_threads(args.threads)
    tokenizer = Tokenizer(args.model)
    most = max(_num_requests(b, args.min_requests) for b in args.batch_sizes)
    prompts = {
        trace: [tokenizer.encode_chat(list(t.messages)) for t in take(TRACES[trace](), most)]
        for trace in args.traces
    }
    num_kv_blocks = max(
        _kv_blocks(p[: max(args.batch_sizes)], args.max_tokens) for p in prompts.values()
    )
    engines = build_engines(args, num_kv_blocks)
    for method, core in engines.items():  # warm-up: every batch size's shapes, drafts too
        for b in args.batch_sizes:
            run_batch(core, prompts[args.traces[0]][:b], b, WARMUP_TOKENS, f"warm-{method}")
    rows: list[dict[str, Any]] = []
    cells = [(trace, b) for trace in args.traces for b in args.batch_sizes]
    for trace, b in tqdm(cells, desc="cells"):
        cell_prompts = prompts[trace][: _num_requests(b, args.min_requests)]
        runs: dict[str, list[BatchRun]] = {m: [] for m in args.methods}
        for rep in range(args.repeats):
            shift = rep % len(args.methods)
            order = args.methods[shift:] + args.methods[:shift]
            for method in order:
                tenant = f"{trace}/bs{b}/r{rep}/{method}"
                runs[method].append(
                    run_batch(engines[method], cell_prompts, b, args.max_tokens, tenant)
                )
        cell_rows = [_cell_row(trace, b, m, runs[m], runs["off"]) for m in args.methods]
        for row in cell_rows:
            logger.info("speculative cell", extra={k: v for k, v in row.items() if v is not None})
        rows.extend(cell_rows)
    targets = check_targets(rows)
    first = next(iter(engines.values()))
    args.meta = {
        **machine_info(),
        "model": str(first.config.model),
        "impl": args.impl,
        "engine": {**IMPLS[args.impl], "num_kv_blocks": num_kv_blocks, "prefix_caching": False},
        "speculative": first.config.speculative.model_dump(exclude={"method"}),
        "traces": args.traces,
        "batch_sizes": args.batch_sizes,
        "methods": args.methods,
        "max_tokens": args.max_tokens,
        "min_requests": args.min_requests,
        "repeats": args.repeats,
        "prompt_tokens": {t: [len(p) for p in ps] for t, ps in prompts.items()},
        "targets": targets,
    }
    return rows


def _cell_row(
    trace: str, batch: int, method: str, runs: list[BatchRun], off: list[BatchRun]
) -> dict[str, Any]:
    tpots = [r.tpot_s for r in runs if r.tpot_s is not None]
    counts = [r.spec_counts for r in runs]
    drafted, accepted, verify_steps, emitted = (sum(c[i] for c in counts) for i in range(4))
    identical = all(
        [t.token_ids for t in run.requests] == [t.token_ids for t in ref.requests]
        for run, ref in zip(runs, off, strict=True)
    )
    row: dict[str, Any] = {
        "workload": f"{trace} bs{batch}",
        "trace": trace,
        "batch": batch,
        "method": method,
        "tpot_ms": 1e3 * statistics.median(tpots) if tpots else None,
        "ttft_ms": 1e3 * statistics.median(r.ttft_s for r in runs),
        "tokens_per_s": statistics.median(r.tokens_per_s for r in runs),
        "acceptance": accepted / drafted if drafted else None,
        "mean_len": emitted / verify_steps if verify_steps else None,
        "drafted_tokens": drafted,
        "accepted_tokens": accepted,
        "identical": identical,
        "num_requests": len(runs[0].requests),
        "output_tokens": [sum(len(t.token_ids) for t in r.requests) for r in runs],
        "tpot_ms_repeats": [None if t is None else 1e3 * t for t in (r.tpot_s for r in runs)],
        "spread": _spread(tpots) if tpots else None,
    }
    off_tpots = [r.tpot_s for r in off if r.tpot_s is not None]
    if off_tpots and tpots:
        row["vs_off"] = statistics.median(off_tpots) / statistics.median(tpots)
    return row


def check_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mark each drafting method's target rows MET/MISSED; return one verdict per target."""
    verdicts = []
    for method in {r["method"] for r in rows} - {"off"}:
        mine = [r for r in rows if r["method"] == method and r.get("vs_off") is not None]
        code = [r for r in mine if r["trace"] == "code-edit" and r["batch"] == 1]
        for row in code:
            row["target"] = f">={CODE_EDIT_SPEEDUP:g}x off, identical"
            met = row["vs_off"] >= CODE_EDIT_SPEEDUP and row["identical"]
            row["status"] = "MET" if met else "MISSED"
        control = [r for r in mine if r["trace"] == "control"]
        for row in control:
            row["target"] = f"<={CONTROL_SLOWDOWN - 1:.0%} slower"
            row["status"] = "MET" if row["vs_off"] >= 1 / CONTROL_SLOWDOWN else "MISSED"
        for name, group in (("code-edit bs1", code), ("control every batch", control)):
            if group:
                met = all(r["status"] == "MET" for r in group)
                verdicts.append({"target": name, "method": method, "met": met})
    return sorted(verdicts, key=lambda v: (v["target"], v["method"]))


def _spread(values: list[float]) -> str:
    """min-max of the repeats, as a fraction of the median (how noisy the machine was)."""
    med = statistics.median(values)
    return f"{(min(values) - med) / med:+.0%}/{(max(values) - med) / med:+.0%}"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """TPOT per batch size, one line per method, one panel per trace."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = list(dict.fromkeys(r["trace"] for r in rows))
    fig, axes = plt.subplots(1, len(traces), figsize=(6 * len(traces), 4.5), squeeze=False)
    for ax, trace in zip(axes[0], traces, strict=True):
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["trace"] == trace and r["method"] == method]
            mine = [r for r in mine if r["tpot_ms"] is not None]
            ax.plot([r["batch"] for r in mine], [r["tpot_ms"] for r in mine], "o-", label=method)
        ax.set_xscale("log", base=2)
        batches = sorted({r["batch"] for r in rows})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("batch size")
        ax.set_ylabel("median TPOT, ms (lower is better)")
        ax.set_title(trace)
        ax.legend()
    fig.suptitle("speculative decoding: TPOT, off vs ngram vs suffix")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print_summary(rows: list[dict[str, Any]], targets: list[dict[str, Any]]) -> None:
    console = Console(width=150)
    for row in rows:
        if row["method"] != "off" and row.get("vs_off") is not None:
            console.print(
                f"{row['workload']:>16}  TPOT off/{row['method']}: {row['vs_off']:.2f}x"
                f"  identical: {row['identical']}"
            )
    for verdict in targets:
        status = "MET" if verdict["met"] else "MISSED"
        console.print(f"target {verdict['target']} ({verdict['method']}): {status}")


def _csv(kind: type, choices: tuple[str, ...] | None = None):
    def parse(text: str) -> list:
        values = [kind(v) for v in text.split(",") if v]
        if choices is not None and not set(values) <= set(choices):
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)}")
        return values

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ops bench speculative",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", type=Path, default=None, help="model dir (default: SmolLM2)")
    parser.add_argument("--impl", default="int4", choices=sorted(IMPLS), help="engine precision")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--traces", type=_csv(str, tuple(TRACES)), default=list(TRACES))
    parser.add_argument("--batch-sizes", type=_csv(int), default=[1, 4, 8, 32])
    parser.add_argument("--methods", type=_csv(str, METHODS), default=list(METHODS))
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--min-requests", type=int, default=3, help="requests per cell, at least")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs (median)")
    parser.add_argument("--num-speculative-tokens", type=int, default=6)
    parser.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument(
        "--spec-args", type=json.loads, default={}, help="JSON merged into engine.speculative"
    )
    parser.add_argument("--name", default=None, help="JSON stem (default speculative-<time>)")
    parser.add_argument("--plot", type=Path, default=RESULTS_DIR / "speculative.png")
    args = parser.parse_args(argv)
    args.model = args.model or default_model_dir()
    if "off" not in args.methods:  # every ratio and `identical` compare with it
        args.methods = ["off", *args.methods]
    rows = run(args)
    name = args.name or time.strftime("speculative-%Y%m%d-%H%M%S")
    write_report(name, rows, args.meta, COLUMNS)
    plot(rows, args.plot)
    _print_summary(rows, args.meta["targets"])
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    raise SystemExit(main())
