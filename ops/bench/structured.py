"""Grammar-constrained decoding: what structured rows cost a decode batch, and what a grammar
costs to compile and to mask.

    python -m ops bench structured [--threads 2] [--decode-tokens 32] [--repeats 3]

One EngineCore in this process (the default model, float32, prefix cache off); the workload
(schemas, tools, prompts) is in ops/bench/_structured_workload.py.

TPOT of a batch of 8 rows with 0 %, 50 % (the even rows) and 100 % of them structured.
Structured rows alternate a json_schema response (a ticket object: enums, a bounded
integer, strings with minLength/maxLength, a bounded array) and a required call to one of 3
tools (`app.tools.output_grammar`, choice "required", no parallel calls). Each row keeps its
own prompt (the app's Hermes prompt for tool rows) and seed (temperature 0.8, EOS ignored)
in every mode: only `SamplingParams.grammar` differs.
- Window: prefill and each row's first token are not timed; then W (`--decode-tokens`)
  decode steps are, counted only while every row runs (a structured row ends with its
  grammar, and a smaller batch steps faster). TPOT = the window's time / the tokens each
  row emitted in it; tokens/s = rows / TPOT. Each mode is compared with the unstructured
  runs over the same steps (same positions, same KV lengths).
- Plain rows run with fast-forward off: one sampled token per row per step, so the
  difference is the grammar work alone (fill, apply_bitmask, accept). The target,
  TPOT(100 %) / TPOT(0 %) <= 1.10, is judged there. `+ff` rows run the engine's default
  (`grammar_fast_forward`: forced tokens appended with the sampled one and computed in the
  next step, counted when emitted).
- A warm-up per setting runs every row structured: sampling is seeded per (seed, position),
  so the timed runs emit the same tokens, and W is cut to the steps they last if an output
  ends inside it (logged; `steps`). The rest of each request is then aborted.
- Modes are interleaved, the order rotating every repeat, so drift hits each alike; the
  median over `--repeats` is reported with its min/max spread (step times in the JSON).

Compile: `--compile-grammars` distinct 10-tool grammars (one enum differs: all misses) on a
fresh GrammarCompiler, tokenizer already built: p50/p99 of `compile`, of `state` (a cache
hit + a matcher copy, what a request gets), of its first mask (llguidance builds its lexer
lazily), then of `compile` again (cache hits, checked by `hits`). Mask: p50/p99 of
`GrammarState.fill` on one row at every position of the model's own seeded constrained
output (replayed on fresh states), JSON and 10-tool grammars; `apply_bitmask` on one row.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from app.api.messages import ChatMessage, Tool
from app.tools import template_messages
from engine import EngineConfig, EngineCore, EngineRequest, SamplingParams
from engine.config import default_model_dir
from engine.structured import GrammarCompiler, apply_bitmask, bitmask_words, json_grammar
from ops.bench._report import machine_info, write_report
from ops.bench._structured_workload import TICKETS, TOOL_ASKS, ticket_grammar, tool_grammar, tools

logger = logging.getLogger(__name__)

COLUMNS = ["workload", "step_ms", "tpot_ms", "tokens_per_s", "steps", "vs_0pct", "target"]
COLUMNS += ["status", "p50_ms", "p99_ms", "n", "spread"]
TARGET_RATIO = 1.10
TEMPERATURE = 0.8
MASK_TOKENS = 160  # the longest output replayed for the mask cost
MAX_TOKENS = 1024  # never reached: a window ends first


def _tools_prompt(engine: EngineCore, offered: tuple[Tool, ...], ask: str) -> list[int]:
    """The prompt the app builds for `ask` with `offered` tools (app.service.chat_prompt)."""
    user = [ChatMessage(role="user", content=ask)]
    messages, extra = template_messages(user, offered, native=engine.tokenizer.renders_tools)
    return engine.tokenizer.encode_chat(messages, **extra)


@dataclass(frozen=True, slots=True)
class Row:
    """One batch row: its prompt, its seed and its grammar when the mode structures it."""

    kind: str  # json_schema | tool_call
    prompt: list[int]
    seed: int
    grammar: str


def build_rows(engine: EngineCore, batch: int, seed: int) -> list[Row]:
    """Rows 0,1 json, 2,3 tool, 4,5 json, ...: the even rows (structured at 50 %) alternate."""
    kinds = ["json_schema" if (i // 2) % 2 == 0 else "tool_call" for i in range(batch)]
    rows = []
    for i, kind in enumerate(kinds):
        j = kinds[:i].count(kind) % 4  # a prompt of its own among the rows of its kind
        if kind == "json_schema":
            ask = f"Triage this support ticket; reply with JSON only.\n\n{TICKETS[j]}"
            prompt = engine.tokenizer.encode_chat([{"role": "user", "content": ask}])
            rows.append(Row(kind, prompt, seed + i, ticket_grammar()))
        else:
            prompt = _tools_prompt(engine, tools(3), TOOL_ASKS[j])
            rows.append(Row(kind, prompt, seed + i, tool_grammar(tools(3))))
    return rows


# ---------------------------------------------------------------------- TPOT
@dataclass(frozen=True, slots=True)
class Mode:
    """How many rows a run structures (even rows first), and with fast-forward or not."""

    fraction: float
    fast_forward: bool = False

    def label(self, batch: int) -> str:
        return f"decode bs{batch}, {self.fraction:.0%} structured" + " +ff" * self.fast_forward

    def rows(self, batch: int) -> list[int]:
        return sorted([*range(0, batch, 2), *range(1, batch, 2)][: round(batch * self.fraction)])


MODES = (Mode(0.0), Mode(0.5), Mode(1.0), Mode(0.5, True), Mode(1.0, True))


@dataclass(slots=True)
class Window:
    """One timed run: each step's wall time and the output tokens it emitted (all rows)."""

    step_s: list[float]
    tokens: list[int]

    def tpot(self, rows: int, steps: int) -> float:
        """Seconds per output token per row over the first `steps` steps."""
        return sum(self.step_s[:steps]) * rows / sum(self.tokens[:steps])


def decode_window(engine: EngineCore, rows: list[Row], mode: Mode, window: int) -> Window:
    """Up to `window` decode steps after every row's first token, while every row runs;
    the rest of each request is aborted."""
    # NOTE: one engine for every mode (same weights in the same memory); only EngineCore
    # reads this knob, per step, so swapping its config between runs is enough.
    engine.config = engine.config.model_copy(update={"grammar_fast_forward": mode.fast_forward})
    ids = [f"structured-{i}" for i in range(len(rows))]
    for i, (rid, row) in enumerate(zip(ids, rows, strict=True)):
        grammar = row.grammar if i in mode.rows(len(rows)) else None
        params = SamplingParams(
            temperature=TEMPERATURE,
            seed=row.seed,
            max_tokens=MAX_TOKENS,
            ignore_eos=True,
            grammar=grammar,
        )
        engine.add_request(EngineRequest(rid, row.prompt, params))
    try:
        started: set[str] = set()
        while len(started) < len(ids):  # prefill and first tokens (not timed)
            outs = engine.step()
            started |= {o.request_id for o in outs}
            if any(o.finished for o in outs):
                raise RuntimeError("a row finished on its first step: nothing to time")
        win = Window([], [])
        while len(win.step_s) < window:
            t0 = time.perf_counter()
            outs = engine.step()
            win.step_s.append(time.perf_counter() - t0)
            win.tokens.append(sum(len(o.new_token_ids) for o in outs))
            assert len(outs) == len(ids), "a step ran without every row"
            if any(o.finished for o in outs):  # this step still ran every row; the next not
                break
        return win
    finally:
        for rid in ids:
            engine.abort(rid)


def decode_rows(
    engine: EngineCore, rows: list[Row], args: argparse.Namespace
) -> tuple[list[dict[str, Any]], dict[bool, int]]:
    """The TPOT rows of the table, and the window (steps) of each fast-forward setting."""
    default, batch = engine.config, len(rows)
    windows = {}
    for ff in (False, True):  # warm-up: compiles the grammars, finds each setting's window
        windows[ff] = len(decode_window(engine, rows, Mode(1.0, ff), args.decode_tokens).step_s)
        if windows[ff] < args.decode_tokens:
            extra = {"fast_forward": ff, "steps": windows[ff]}
            logger.warning("an output ends inside the window: window shortened", extra=extra)
    runs: dict[Mode, list[Window]] = {m: [] for m in MODES}
    jobs = [MODES[(r + k) % len(MODES)] for r in range(args.repeats) for k in range(len(MODES))]
    for mode in tqdm(jobs, desc="decode windows", unit="run"):
        window = windows[mode.fast_forward] if mode.fraction else args.decode_tokens
        runs[mode].append(win := decode_window(engine, rows, mode, window))
        extra = {"mode": mode.label(batch), "steps": len(win.step_s), "window": window}
        cut = len(win.step_s) < window  # a row ended earlier than in the warm-up
        logger.log(logging.WARNING if cut else logging.INFO, "window", extra=extra)
    engine.config = default
    table = []
    for mode in MODES:
        steps = min(len(w.step_s) for w in runs[mode])
        tpots = [w.tpot(batch, steps) for w in runs[mode]]
        # the unstructured baseline over the same steps (same positions, same KV lengths)
        base = statistics.median(w.tpot(batch, steps) for w in runs[MODES[0]])
        kinds = [rows[i].kind for i in mode.rows(batch)]
        tpot = statistics.median(tpots)
        row: dict[str, Any] = {
            "workload": mode.label(batch),
            "structured_frac": mode.fraction,
            "fast_forward": mode.fast_forward,
            "json_rows": kinds.count("json_schema"),
            "tool_rows": kinds.count("tool_call"),
            "step_ms": statistics.median(1e3 * sum(w.step_s[:steps]) / steps for w in runs[mode]),
            "tpot_ms": 1e3 * tpot,
            "tokens_per_s": batch / tpot,
            "steps": steps,
            "vs_0pct": tpot / base if mode.fraction else None,
            "spread": _spread(tpots),
            "tpot_ms_runs": [t * 1e3 for t in tpots],
            "step_ms_each_run": [[round(t * 1e3, 2) for t in w.step_s] for w in runs[mode]],
        }
        if mode.fraction == 1.0 and not mode.fast_forward:
            row["target"] = f"<={TARGET_RATIO:.2f}x"
            row["status"] = "PASS" if row["vs_0pct"] <= TARGET_RATIO else "MISS"
        table.append(row)
    return table, windows


# ---------------------------------------------------------------------- compile and mask
def _percentiles(workload: str, samples_s: list[float]) -> dict[str, Any]:
    ms = sorted(s * 1e3 for s in samples_s)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))]
    return {"workload": workload, "p50_ms": statistics.median(ms), "p99_ms": p99, "n": len(ms)}


def compile_rows(engine: EngineCore, n: int) -> list[dict[str, Any]]:
    """Compile n distinct 10-tool grammars on a fresh compiler (misses), then again (hits)."""
    vocab, model = engine.model_config.vocab_size, engine.config.model
    compiler = GrammarCompiler(model / "tokenizer.json", vocab, sorted(engine.eos_token_ids))
    compiler.compile(json_grammar({"type": "integer"}))  # builds the tokenizer once
    grammars = [tool_grammar(tools(10, v)) for v in range(n)]
    assert len(set(grammars)) == n, "the grammar variants must differ"
    bitmask = torch.zeros((1, bitmask_words(vocab)), dtype=torch.int32)
    miss, new_state, mask, hit = [], [], [], []
    for grammar in tqdm(grammars, desc="compile (miss)", unit="grammar", leave=False):
        t0 = time.perf_counter()
        compiler.compile(grammar)
        t1 = time.perf_counter()
        state = compiler.state(grammar)  # what add_request does: a cache hit + a copy
        t2 = time.perf_counter()
        state.fill(bitmask, 0)
        mask.append(time.perf_counter() - t2)
        miss.append(t1 - t0)
        new_state.append(t2 - t1)
    assert compiler.misses == n + 1, "every variant must be a cache miss"
    hits = compiler.hits
    for grammar in grammars:
        t0 = time.perf_counter()
        compiler.compile(grammar)
        hit.append(time.perf_counter() - t0)
    assert compiler.hits == hits + n and compiler.misses == n + 1, "repeats must hit the cache"
    return [
        _percentiles("compile 10 tools, miss", miss),
        _percentiles("first mask after compile", mask),
        _percentiles("compile 10 tools, hit", hit),
        _percentiles("state from cache (copy)", new_state),
    ]


def mask_rows(engine: EngineCore, rows: list[Row], args: argparse.Namespace) -> list[dict]:
    """`GrammarState.fill` on one row at every position of the model's own output."""
    vocab = engine.model_config.vocab_size
    json_row = next(r for r in rows if r.kind == "json_schema")
    cases = (
        ("json_schema", json_row.grammar, json_row.prompt),
        ("10 tools", tool_grammar(tools(10)), _tools_prompt(engine, tools(10), TOOL_ASKS[1])),
    )
    bitmask = torch.zeros((1, bitmask_words(vocab)), dtype=torch.int32)
    table = []
    for label, grammar, prompt in cases:
        params = SamplingParams(
            temperature=TEMPERATURE, seed=args.seed, max_tokens=MASK_TOKENS, grammar=grammar
        )
        (out,) = engine.generate([prompt], params)
        fill = []
        for _ in tqdm(range(args.mask_replays), desc=f"mask fill {label}", leave=False):
            state = engine.grammars.state(grammar)
            for token in out.new_token_ids:
                t0 = time.perf_counter()
                state.fill(bitmask, 0)
                fill.append(time.perf_counter() - t0)
                if not state.accept(token):
                    raise RuntimeError(f"replay broke the {label} grammar: {state.error}")
        table.append(_percentiles(f"fill 1 row, {label}", fill))
    logits, apply = torch.randn(1, vocab), []
    for _ in range(200):
        row = logits.clone()
        t0 = time.perf_counter()
        apply_bitmask(row, bitmask)
        apply.append(time.perf_counter() - t0)
    return [*table, _percentiles("apply_bitmask 1 row", apply)]


# ---------------------------------------------------------------------- the run
def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    torch.set_num_threads(args.threads)
    engine = EngineCore(
        EngineConfig(
            model=args.model,
            dtype=args.dtype,
            num_threads=args.threads,
            max_num_seqs=max(8, args.batch),
            max_num_batched_tokens=8192,
            enable_prefix_caching=False,
        )
    )
    rows = build_rows(engine, args.batch, args.seed)
    table, windows = decode_rows(engine, rows, args)
    table += compile_rows(engine, args.compile_grammars)
    table += mask_rows(engine, rows, args)
    grammars = {"json_schema": ticket_grammar(), "3 tools": tool_grammar(tools(3))}
    grammars["10 tools"] = tool_grammar(tools(10))
    meta = machine_info() | {
        "model": str(engine.config.model),
        "llguidance": version("llguidance"),
        "window_steps": {"fast_forward_off": windows[False], "fast_forward_on": windows[True]},
        "row_kinds": [r.kind for r in rows],
        "seeds": [r.seed for r in rows],
        "prompt_tokens": [len(r.prompt) for r in rows],
        "grammar_chars": {k: len(g) for k, g in grammars.items()},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    return table, meta


def _spread(values: list[float]) -> str:
    """min-max of the repeats, as a fraction of the median (how noisy the machine was)."""
    med = statistics.median(values)
    return f"{(min(values) - med) / med:+.0%}/{(max(values) - med) / med:+.0%}"


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    decode = [r for r in rows if "structured_frac" in r]
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    xs = list(range(len(decode)))
    colours = ["tab:orange" if r["fast_forward"] else "tab:blue" for r in decode]
    ax.bar(xs, [r["tpot_ms"] for r in decode], color=colours)
    for x, r in zip(xs, decode, strict=True):
        ax.scatter([x] * len(r["tpot_ms_runs"]), r["tpot_ms_runs"], color="black", s=10, zorder=3)
    limit = decode[0]["tpot_ms"] * TARGET_RATIO
    ax.axhline(limit, color="grey", linestyle="--", linewidth=1)
    ax.annotate(f"target: {TARGET_RATIO:.2f}x 0 %", (-0.4, limit), va="bottom", fontsize=8)
    ax.set_xticks(xs, [f"{r['structured_frac']:.0%}" + " ff" * r["fast_forward"] for r in decode])
    ax.set(
        xlabel="structured rows (ff: forced tokens fast-forwarded)",
        ylabel="TPOT (ms per output token per row)",
        title=f"{decode[0]['workload'].split(',')[0]}: TPOT by structured fraction (dots: runs)",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ops bench structured",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", type=Path, default=default_model_dir())
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--decode-tokens", type=int, default=32, help="timed steps per run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs (median)")
    parser.add_argument("--compile-grammars", type=int, default=50)
    parser.add_argument("--mask-replays", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--name", default="structured", help="output file stem")
    parser.add_argument("--strict", action="store_true", help="exit 1 if the target is missed")
    args = parser.parse_args(argv)
    rows, meta = run(args)
    write_report(args.name, rows, meta, COLUMNS, _plot)
    return 1 if args.strict and any(r.get("status") == "MISS" for r in rows) else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    raise SystemExit(main())
