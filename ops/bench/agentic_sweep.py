"""Shape sweep of the agentic replay: does DualPath's gain hold across trace shapes?

    python -m ops bench agentic --sweep [--shapes default,long-gen] [--modes ...]
        [--turns 2 ...]   (a shape flag given with --sweep overrides it in every shape)

Every shape replays single_path, dualpath, dualpath_split and oracle on the cluster of
ops/bench/agentic.py (1 PE node + 2 DE nodes, SNICs capped at `--snic-mbps`), offline, one
untimed warm-up turn per agent, all in one Ray start. Writes bench-results/agentic-sweep.json
and .png, and prints a table and a target line per shape.

Shapes (SHAPES below). Each stresses one side of a turn: what it reads (context), computes
(append), decodes (gen), and how many agents share the SNICs:

    default       4 agents x 6 turns, context 1024, append 128, gen 8 (docs' table, unchanged)
    heavy-append  2 x 3, context 512, append 1000, gen 16: prefill-bound
    long-context  2 x 3, context 3584, append 32, gen 16: read-bound
    long-gen      3 x 3, context 512, append 128, gen 128: decode-bound
    many-agents   8 x 3, context 512, append 64, gen 8: many concurrent readers

Why these sizes: the whole sweep must finish in ~45 min on the 2-core machine, where each
mode costs a fresh deployment (~25 s) plus a cold warm-up turn per agent. The default shape
is ~9 min; the others were cut (fewer turns, fewer agents where a turn is long) to ~5-11 min
each, estimated with the calibrated simulator (ops/sim, scenarios/one-machine.yaml with each
trace) plus 25 s per deployment: default 9.0, heavy-append 10.2, long-context 11.6, long-gen
8.7, many-agents 5.4 min; ~45 min in all (the simulator ran ~6% under the measured default).
long-context starts at 3,584 tokens, not 4,000: at 4,000 it alone took ~14 min. Its and
heavy-append's last prompt (~3,800 and ~4,300 tokens) do not fit the default 160 MiB pool
(3,584 tokens at 46 KB per token, fp32), and an engine refuses a prompt + max_tokens larger
than its pool: those two shapes get 512 MiB per engine (and as large a NIXL staging pool),
1.5 GiB each for the 3 engines; the others keep 160 MiB, as the default.

Targets per shape, for dualpath and dualpath_split (TARGETS): JCT >= 1.3x single_path and
>= 80% of the oracle's gain ((single - mode) / (single - oracle)), both only where the
oracle itself reaches >= 1.3x (the shape is storage-bound; elsewhere they cannot be met and
read n/a); SNIC max/avg <= 1.3; hit rate >= single_path's; never below 0.97x single_path.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ops.bench._report import RESULTS_DIR, _fmt, machine_info
from ops.sim.traces import BENCH_TRACE

logger = logging.getLogger(__name__)
MODEL_CONTEXT = 8192  # SmolLM2-135M's max_position_embeddings
KV_BYTES_PER_TOKEN = 46_080  # its fp32 KV: 2 x 30 layers x 3 KV heads x 64 dims x 4 B
BLOCK_SIZE = 64
DUALPATH_MODES = ("dualpath", "dualpath_split")
STORAGE_BOUND_X = 1.3  # the oracle's speedup at which a shape counts as storage-bound
TARGETS = {"speedup_x": 1.3, "oracle_share": 0.8, "snic_max_avg": 1.3, "floor_x": 0.97}
COLUMNS = [  # (row key, table header)
    ("mode", "mode"),
    ("jct_s", "JCT s"),
    ("vs_single", "vs single"),
    ("oracle_gain", "oracle gain"),
    ("read_paths", "read paths"),
    ("snic_max_avg", "SNIC max/avg"),
    ("hit_rate", "hit rate"),
    ("ttft_p50_ms", "TTFT p50 ms"),
    ("queue_ms", "queue ms"),
    ("sched_ms", "sched ms"),
    ("read_ms", "KV read ms"),
    ("prefill_ms", "prefill ms"),
    ("tpot_p50_ms", "TPOT p50 ms"),
]


@dataclass(frozen=True, slots=True)
class Shape:
    """One trace shape: make_trace's arguments and the engines' KV pool."""

    name: str
    agents: int
    turns: int
    context: int
    append: int
    gen: int
    kv_cache_mib: int = 160

    @property
    def max_tokens(self) -> int:
        """Worst-case last prompt + reply: make_trace draws appends up to 5/4 of the mean
        and generated counts up to 6/5."""
        return self.context + self.turns * (self.append * 5 // 4 + self.gen * 6 // 5)

    @property
    def kv_pool_tokens(self) -> int:
        per_block = KV_BYTES_PER_TOKEN * BLOCK_SIZE
        return (self.kv_cache_mib * 2**20 // per_block) * BLOCK_SIZE

    def describe(self) -> str:
        return (
            f"{self.agents} agents x {self.turns} turns, context {self.context}, "
            f"~{self.append} appended and ~{self.gen} generated per turn, "
            f"KV pool {self.kv_cache_mib} MiB per engine"
        )


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("default", **BENCH_TRACE),
        Shape(
            "heavy-append", agents=2, turns=3, context=512, append=1000, gen=16, kv_cache_mib=512
        ),
        Shape("long-context", agents=2, turns=3, context=3584, append=32, gen=16, kv_cache_mib=512),
        Shape("long-gen", agents=3, turns=3, context=512, append=128, gen=128),
        Shape("many-agents", agents=8, turns=3, context=512, append=64, gen=8),
    )
}


def select_shapes(names: str, overrides: dict[str, int]) -> list[Shape]:
    """The shapes named in `names` (all when empty), with `overrides` applied to each."""
    picked = [n for n in names.split(",") if n] or list(SHAPES)
    unknown = [n for n in picked if n not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shapes {unknown}; known: {', '.join(SHAPES)}")
    return [dataclasses.replace(SHAPES[n], **overrides) for n in picked]


def oracle_gain_share(single_jct: float, mode_jct: float, oracle_jct: float) -> float | None:
    """The share of the oracle's JCT gain over single_path that a mode reaches (1.0: all
    of it); None when the oracle gained nothing, so there is no gain to share."""
    gain = single_jct - oracle_jct
    return round((single_jct - mode_jct) / gain, 2) if gain > 0 else None


def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Set `vs_single` (single_path JCT / JCT) and, on DualPath modes, `oracle_gain` on the
    rows of one shape, in place; None where single_path or oracle is missing."""
    by_mode = {r["mode"]: r for r in rows}
    single, oracle = by_mode.get("single_path"), by_mode.get("oracle")
    for r in rows:
        r["vs_single"] = round(single["jct_s"] / r["jct_s"], 2) if single and r["jct_s"] else None
        r["oracle_gain"] = (
            oracle_gain_share(single["jct_s"], r["jct_s"], oracle["jct_s"])
            if single and oracle and r["mode"] in DUALPATH_MODES
            else None
        )
    return rows


def _check(value: float | None, is_ok: bool, applies: bool = True) -> dict[str, Any]:
    return {"value": value, "pass": is_ok if applies and value is not None else None}


def evaluate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Storage-boundness and every target of one shape's rows (after add_ratios).

    Returns {"oracle_x", "storage_bound", "targets": {mode: {target: {"value", "pass"}}}};
    `pass` is None where it cannot be judged: a mode missing, or (speedup, oracle share)
    a shape where even the oracle stays under STORAGE_BOUND_X.
    """
    by_mode = {r["mode"]: r for r in rows}
    single, oracle = by_mode.get("single_path"), by_mode.get("oracle")
    oracle_x = oracle["vs_single"] if oracle else None
    storage_bound = None if oracle_x is None else oracle_x >= STORAGE_BOUND_X
    targets: dict[str, dict[str, Any]] = {}
    for mode in DUALPATH_MODES:
        r = by_mode.get(mode)
        if r is None:
            continue
        x, share, snic = r["vs_single"], r["oracle_gain"], r["snic_max_avg"]
        single_hit = single["hit_rate"] if single else None
        gated = storage_bound is not False
        targets[mode] = {
            "speedup_x": _check(x, x is not None and x >= TARGETS["speedup_x"], gated),
            "oracle_share": _check(
                share, share is not None and share >= TARGETS["oracle_share"], gated
            ),
            "snic_max_avg": _check(snic, snic is not None and snic <= TARGETS["snic_max_avg"]),
            "hit_rate": _check(
                r["hit_rate"],
                single_hit is not None and r["hit_rate"] >= single_hit,
                single_hit is not None,
            ),
            "floor_x": _check(x, x is not None and x >= TARGETS["floor_x"]),
        }
    return {"oracle_x": oracle_x, "storage_bound": storage_bound, "targets": targets}


def summary_line(name: str, verdict: dict[str, Any]) -> str:
    """One line: the shape, whether it is storage-bound, and PASS / FAIL / n/a per target."""
    mark = {True: "PASS", False: "FAIL", None: "n/a"}
    bound = {True: "storage-bound", False: "not storage-bound", None: "no oracle run"}
    head = f"{name}: oracle {_fmt(verdict['oracle_x'])}x ({bound[verdict['storage_bound']]})"
    parts = [head]
    for mode, checks in verdict["targets"].items():
        c = checks
        parts.append(
            f"{mode}: >=1.3x {mark[c['speedup_x']['pass']]} ({_fmt(c['speedup_x']['value'])}), "
            f">=80% oracle {mark[c['oracle_share']['pass']]} ({_fmt(c['oracle_share']['value'])}), "
            f"SNIC<=1.3 {mark[c['snic_max_avg']['pass']]} ({_fmt(c['snic_max_avg']['value'])}), "
            f"hit>=single {mark[c['hit_rate']['pass']]} ({_fmt(c['hit_rate']['value'])}), "
            f">=0.97x {mark[c['floor_x']['pass']]}"
        )
    return " | ".join(parts)


def shape_table(shape: Shape, rows: list[dict[str, Any]]):
    from rich.table import Table

    table = Table(title=f"{shape.name}: {shape.describe()}")
    for key, header in COLUMNS:
        left = key in ("mode", "read_paths")
        table.add_column(header, justify="left" if left else "right", overflow="fold")
    for row in rows:
        table.add_row(*[_fmt(row.get(key)) for key, _ in COLUMNS])
    return table


def _check_fits(shapes: list[Shape], model: Path) -> None:
    """Every shape's longest sequence fits the model's context and one engine's KV pool."""
    from engine.config import EngineConfig, ModelConfig

    cfg = ModelConfig.from_dir(model)
    for s in shapes:
        engine = EngineConfig(model=model, kv_cache_bytes=s.kv_cache_mib * 2**20)
        pool = engine.resolve_num_blocks(cfg) * engine.block_size
        if s.max_tokens >= min(cfg.max_position_embeddings, pool):
            raise ValueError(
                f"shape {s.name}: up to {s.max_tokens} tokens, but the model's context is "
                f"{cfg.max_position_embeddings} and a {s.kv_cache_mib} MiB pool holds {pool}"
            )


def run_sweep(args: argparse.Namespace, overrides: dict[str, int]) -> int:
    """Replay every selected shape in every mode (one Ray start); write the report."""
    from engine.config import ModelConfig
    from ops.bench._serve import serve_session
    from ops.bench.agentic import run_mode
    from ops.sim.traces import make_trace

    shapes = select_shapes(args.shapes, overrides)
    modes = args.modes.split(",")
    _check_fits(shapes, args.model)
    vocab = ModelConfig.from_dir(args.model).vocab_size
    rows: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    path = RESULTS_DIR / f"{args.name}.json"
    # NOTE: 3 engines of one thread each on a 2-core machine: Ray is told 4 logical CPUs.
    with (
        serve_session(num_cpus=4) as port,
        tqdm(total=len(shapes) * len(modes), desc="sweep", unit="mode") as bar,
    ):
        for shape in shapes:
            bar.set_description(f"sweep {shape.name}")
            logger.info("shape start", extra={"shape": shape.name, "trace": shape.describe()})
            shape_args = argparse.Namespace(**{**vars(args), **dataclasses.asdict(shape)})
            agents = make_trace(shape_args, vocab)
            for mode in modes:
                try:
                    rows += [
                        {"shape": shape.name, **r} for r in run_mode(shape_args, mode, agents, port)
                    ]
                except Exception as exc:  # one broken mode must not lose a 45-min sweep
                    logger.exception("mode failed", extra={"shape": shape.name, "mode": mode})
                    failures.append({"shape": shape.name, "mode": mode, "error": repr(exc)})
                bar.update(1)
            # written after every shape, so a crash later keeps what was measured
            path = write_sweep(args, shapes, rows, failures, overrides)
    print_sweep(shapes, rows, path)
    return 0


def _by_shape(shapes: list[Shape], rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    return {s.name: add_ratios([r for r in rows if r["shape"] == s.name]) for s in shapes}


def write_sweep(
    args: argparse.Namespace,
    shapes: list[Shape],
    rows: list[dict[str, Any]],
    failures: list[dict[str, str]],
    overrides: dict[str, int],
) -> Path:
    """bench-results/<name>.json (meta, per-shape verdicts, rows) and <name>.png."""
    from ops.bench._agentic_report import LAYOUT

    grouped = _by_shape(shapes, rows)
    meta = {
        **machine_info(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "layout": LAYOUT.format(snic_mbps=args.snic_mbps),
        "warmup_turns": args.warmup_turns,
        "overrides": overrides,
        "targets": {**TARGETS, "storage_bound_x": STORAGE_BOUND_X},
        "failures": failures,
    }
    shapes_out = {
        s.name: {
            **dataclasses.asdict(s),
            "description": s.describe(),
            "max_tokens": s.max_tokens,
            **evaluate(grouped[s.name]),
        }
        for s in shapes
        if grouped[s.name]
    }
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"{args.name}.json"
    report = {"meta": meta, "shapes": shapes_out, "rows": rows}
    out.write_text(json.dumps(report, indent=2) + "\n")
    _plot(grouped, out.with_suffix(".png"))
    return out


def print_sweep(shapes: list[Shape], rows: list[dict[str, Any]], path: Path) -> None:
    from rich.console import Console

    console = Console(width=160)
    grouped = _by_shape(shapes, rows)
    for shape in shapes:
        if grouped[shape.name]:
            console.print(shape_table(shape, grouped[shape.name]))
    for shape in shapes:
        if grouped[shape.name]:
            console.print(summary_line(shape.name, evaluate(grouped[shape.name])), soft_wrap=True)
    console.print(f"wrote {path} and {path.with_suffix('.png')}")


def _plot(grouped: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, rows in grouped.items() if rows]
    modes = list(dict.fromkeys(r["mode"] for n in names for r in grouped[n]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(1, len(modes))
    for i, mode in enumerate(modes):
        xs = [j + i * width for j in range(len(names))]
        by = [{r["mode"]: r for r in grouped[n]}.get(mode, {}) for n in names]
        ax1.bar(xs, [r.get("vs_single") or 0 for r in by], width, label=mode)
        ax2.bar(xs, [r.get("snic_max_avg") or 0 for r in by], width, label=mode)
    centers = [j + width * (len(modes) - 1) / 2 for j in range(len(names))]
    for ax, line, label, title in (
        (
            ax1,
            TARGETS["speedup_x"],
            "JCT speedup vs single_path (x)",
            "JCT ratio (higher is better)",
        ),
        (ax2, TARGETS["snic_max_avg"], "SNIC traffic max / mean", "SNIC balance (lower is better)"),
    ):
        ax.axhline(line, color="grey", linestyle="--", linewidth=1)
        ax.set_xticks(centers, names, fontsize=8)
        ax.set_ylabel(label)
        ax.set_title(title)
    ax1.axhline(1.0, color="black", linewidth=0.8)
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
