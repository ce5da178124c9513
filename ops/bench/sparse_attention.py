"""Sparse decode attention quality vs dense, on the real model and real text.

    python -m ops bench sparse-attention [--contexts 2048,4096,8128] [--budgets ...]

SmolLM2-135M (float32, 2 threads) reads Python's own documentation (`pydoc_data.topics`,
one token stream of ~113k tokens). For each context length C and each of `--windows`
windows of the stream (evenly spaced starts): the first C tokens are prefilled densely
(chunks of 2,048), then `--steps` decode steps are teacher-forced: step t feeds token C+t
and predicts token C+t+1. Dense decode and sparse decode at each budget run from the same
prefilled KV (each run writes its own decode KV). Reported per (variant, C, budget):

- KV fraction read: K+V tokens the sparse layers read plus the key summaries they scored,
  over what dense attention reads, averaged over layers and steps (measured, not planned);
- top-1 agreement: sparse argmax == dense argmax, over all windows x steps;
- perplexity of the true next tokens, dense and sparse, and the relative delta.

A variant is `summary:score_block_size:profile[:global|:local]`. Summary: how blocks are
ranked, `mean` / `minmax` (key summaries per block), `sparqN` (N key channels of every
token, one channel set per GQA group), or `oracle` (the true attention mass, every key
read: ops/bench/_sparse_oracle.py; it bounds what any ranking can reach at that budget).
Profile `uniform`: every layer gets the budget b; `seed`: the issue's seed shape, linear
from 0.45 (layer 0) to 0.10 (last layer), scaled so the mean is b. `global`: unselected
blocks also take part as one mean-key/mean-value entry each. The budget is the token
fraction; `kv_read` adds what the ranking read. The main variant runs at every context;
the others over the same prefilled KV at `--variant-context` (summaries rebuilt for
each). Context: the model's native window is 8,192 positions, so "8k" is C = 8,128
prefilled + 64 decoded (no
RoPE scaling; nothing is chunked at decode).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch

from engine.config import EngineConfig, ModelConfig, SparseAttentionConfig, default_model_dir

SEED_SHALLOW, SEED_DEEP = 0.45, 0.10


def sparse_config(
    budget: float, profile: str, base: SparseAttentionConfig
) -> SparseAttentionConfig:
    """Per-layer budgets whose mean is `budget` (clipped to 1), on the chosen profile."""
    if profile not in ("uniform", "seed"):
        raise ValueError(f"unknown profile {profile!r} (uniform | seed)")
    if profile == "uniform" or budget >= 1.0:
        return base.model_copy(update={"shallow_fraction": budget, "deep_fraction": budget})
    mean_seed = (SEED_SHALLOW + SEED_DEEP) / 2
    return base.model_copy(
        update={
            "shallow_fraction": min(1.0, budget * SEED_SHALLOW / mean_seed),
            "deep_fraction": min(1.0, budget * SEED_DEEP / mean_seed),
        }
    )


def _summary_kind(variant: tuple[str, int, str, bool]) -> tuple[str, int, bool]:
    """What the summaries of `variant` hold (its profile does not matter to them)."""
    return _stored(variant[0]), variant[1], variant[3]


def _stored(summary: str) -> str:
    """The summary kept in the cache for a variant (rankings that read keys keep means)."""
    return "mean" if summary == "oracle" else summary.rstrip("0123456789")


class TeacherForced:
    """Drives the model directly over a KV cache: dense prefill, teacher-forced decode."""

    def __init__(self, model: Path, num_blocks: int, sparse: SparseAttentionConfig):
        from engine.runner import ModelRunner

        self.config = EngineConfig(
            model=model, num_threads=2, num_kv_blocks=num_blocks, attention="sparse", sparse=sparse
        )
        self.model_config = ModelConfig.from_dir(model)
        torch.set_num_threads(2)
        self.runner = ModelRunner(self.config, self.model_config, num_blocks)
        self.bs = self.config.block_size

    def _ctx(self, positions: list[int], slots: list[int], meta: Any, spec: Any) -> Any:
        from engine.forward_context import ForwardContext, SparseContext
        from engine.kernels.sparse_attention import SparseStats

        r = self.runner
        assert r.sparse_spec is not None
        sbs = r.sparse_spec.score_block_size
        filled = [s // sbs for p, s in zip(positions, slots, strict=True) if (p + 1) % sbs == 0]
        meta.filled_sub_blocks = torch.tensor(filled, dtype=torch.long)
        ctx = ForwardContext(torch.tensor(positions), None, meta, r.kv_layers)
        stats = SparseStats.zeros(self.model_config.num_hidden_layers)
        if spec is not None:  # None: dense decode (no summaries needed or written)
            ctx.sparse = SparseContext(spec, r.kv_summaries, stats)
        return ctx, stats

    @torch.inference_mode()
    def prefill(self, tokens: list[int], table: list[int], chunk: int = 2048) -> None:
        from engine.forward_context import AttentionMetadata, PrefillSpan

        bs = self.bs
        for start in range(0, len(tokens), chunk):
            end = min(len(tokens), start + chunk)
            positions = list(range(start, end))
            slots = [table[p // bs] * bs + p % bs for p in positions]
            mask = None
            if start:
                q_pos = torch.arange(start, end).unsqueeze(1)
                mask = torch.arange(end).unsqueeze(0) <= q_pos
            span = PrefillSpan(0, end - start, end, torch.tensor(table[: -(-end // bs)]), mask)
            meta = AttentionMetadata(torch.tensor(slots), prefills=[span])
            ctx, _ = self._ctx(positions, slots, meta, self.runner.sparse_spec)
            self.runner.model(torch.tensor(tokens[start:end]), ctx)

    @torch.inference_mode()
    def decode(
        self, windows: list[list[int]], tables: list[list[int]], context: int, steps: int, spec: Any
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Teacher-forced decode of all windows at once; spec None = dense.

        Returns:
            (argmax [steps, W], log-prob of the true next token [steps, W], SparseStats).
        """
        from engine.forward_context import AttentionMetadata
        from engine.kernels.sparse_attention import SparseStats

        bs, num = self.bs, len(windows)
        argmax, logprob = [], []
        total = SparseStats.zeros(self.model_config.num_hidden_layers)
        for t in range(steps):
            pos = context + t
            slots = [table[pos // bs] * bs + pos % bs for table in tables]
            width = pos // bs + 1
            meta = AttentionMetadata(
                torch.tensor(slots),
                decode_token_idx=torch.arange(num),
                decode_block_tables=torch.tensor([table[:width] for table in tables]),
                decode_context_len=pos + 1,
                decode_context_lens=torch.full((num,), pos + 1),
            )
            ctx, stats = self._ctx([pos] * num, slots, meta, spec)
            ids = torch.tensor([w[pos] for w in windows])
            hidden = self.runner.model(ids, ctx)
            logp = self.runner.model.compute_logits(hidden).log_softmax(-1)
            argmax.append(logp.argmax(-1))
            logprob.append(logp.gather(1, torch.tensor([[w[pos + 1]] for w in windows]))[:, 0])
            for name in ("tokens_read", "tokens_context", "summaries_read"):
                getattr(total, name).add_(getattr(stats, name))
        return torch.stack(argmax), torch.stack(logprob), total


def _variant(text: str) -> tuple[str, int, str, bool]:
    """`summary:sbs:profile[:global|:local]` (global view on unless `:local`)."""
    summary, sbs, profile, *view = text.split(":")
    if view not in ([], ["global"], ["local"]):
        raise SystemExit(f"variant {text!r}: the 4th field is global or local")
    return summary, int(sbs), profile, view != ["local"]


def _name(summary: str, sbs: int, profile: str, global_view: bool) -> str:
    return f"{summary}:{sbs}:{profile}:{'global' if global_view else 'local'}"


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from pydoc_data.topics import topics

    from engine.kernels.sparse_attention import SparseSpec
    from engine.runner import build_sparse_spec
    from engine.tokenizer import Tokenizer
    from ops.bench._sparse_oracle import oracle_ranking

    contexts = [int(c) for c in args.contexts.split(",")]
    budgets = [float(b) for b in args.budgets.split(",")]
    main_variant = _variant(args.variant)
    extra = [_variant(v) for v in args.variants.split(",") if v]
    tokenizer = Tokenizer(args.model)
    stream = tokenizer.encode(" ".join(v for _, v in sorted(topics.items())))
    longest = max(contexts) + args.steps + 1
    starts = [i * (len(stream) - longest) // max(1, args.windows - 1) for i in range(args.windows)]
    per_seq = -(-longest // 64)
    base = SparseAttentionConfig(num_sink_tokens=args.sink, window_tokens=args.window)
    bench = TeacherForced(args.model, per_seq * args.windows, base)
    runner = bench.runner
    rows: list[dict[str, Any]] = []

    def use_summaries(summary: str, sbs: int, global_view: bool) -> None:
        assert runner.sparse_spec is not None
        fractions = runner.sparse_spec.fractions
        spec = SparseSpec(fractions, args.sink, args.window, sbs, summary, global_view)  # type: ignore[arg-type]
        runner.kv_cache.reset_summaries(spec)
        runner.sparse_spec, runner.kv_summaries = spec, runner.kv_cache.summary_views()

    for context in contexts:
        if context + args.steps > bench.model_config.max_position_embeddings:
            raise SystemExit(f"context {context} + {args.steps} steps exceeds the model window")
        windows = [stream[s : s + context + args.steps + 1] for s in starts]
        tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(args.windows)]
        use_summaries(*_summary_kind(main_variant))
        started = time.perf_counter()
        for window, table in zip(windows, tables, strict=True):
            bench.prefill(window[:context], table)
        prefill_s = time.perf_counter() - started
        dense_top, dense_lp, _ = bench.decode(windows, tables, context, args.steps, None)
        dense_ppl = math.exp(-dense_lp.mean().item())
        plan = [(main_variant, budgets)]
        if context == args.variant_context:
            vb = [float(b) for b in args.variant_budgets.split(",")]
            plan += [(v, vb) for v in extra]
        for (summary, sbs, profile, global_view), run_budgets in plan:
            stored = _stored(summary)
            use_summaries(stored, sbs, global_view)
            for budget in run_budgets:
                knobs = {"summary": stored, "score_block_size": sbs, "global_view": global_view}
                if summary.startswith("sparq") and summary != "sparq":
                    knobs["channels"] = int(summary.removeprefix("sparq"))
                sparse = sparse_config(budget, profile, base).model_copy(update=knobs)
                spec = build_sparse_spec(
                    bench.config.model_copy(update={"sparse": sparse}), bench.model_config
                )
                started = time.perf_counter()
                layers = (runner.kv_layers, runner.kv_summaries or [])
                ranking: Any = contextlib.nullcontext()
                if summary == "oracle":
                    ranking = oracle_ranking(*layers)
                with ranking:
                    top, lp, stats = bench.decode(windows, tables, context, args.steps, spec)
                ppl = math.exp(-lp.mean().item())
                per_layer = (stats.tokens_read / stats.tokens_context).tolist()
                rows.append(
                    {
                        "variant": _name(summary, sbs, profile, global_view),
                        "context": context,
                        "budget": budget,
                        "kv_read": round(stats.kv_fraction(include_summaries=True), 4),
                        "kv_read_tokens_only": round(stats.kv_fraction(False), 4),
                        "top1_agreement": round((top == dense_top).float().mean().item(), 4),
                        "ppl_dense": round(dense_ppl, 3),
                        "ppl_sparse": round(ppl, 3),
                        "ppl_delta_pct": round(100 * (ppl / dense_ppl - 1), 2),
                        "layer_read": [round(f, 3) for f in per_layer],
                        "decode_s": round(time.perf_counter() - started, 1),
                        "prefill_s": round(prefill_s, 1),
                    }
                )
                print({k: v for k, v in rows[-1].items() if k != "layer_read"}, flush=True)
    meta = {
        "model": str(args.model),
        "text": "pydoc_data.topics (sorted keys, joined by spaces)",
        "num_stream_tokens": len(stream),
        "windows": args.windows,
        "window_starts": starts,
        "steps": args.steps,
        "samples_per_cell": args.windows * args.steps,
        "sink_tokens": args.sink,
        "window_tokens": args.window,
        "kv_block_size": 64,
        "dtype": "float32",
    }
    return rows, meta


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    main_variant = rows[0]["variant"]
    series = sorted(
        {(r["variant"], r["context"]) for r in rows}, key=lambda v: (v[0] != main_variant, v)
    )
    for variant, context in series:
        sel = [r for r in rows if r["variant"] == variant and r["context"] == context]
        sel.sort(key=lambda r: r["kv_read"])
        x = [100 * r["kv_read"] for r in sel]
        style = "-" if variant == main_variant else "--"
        label = f"{context} ctx" + ("" if variant == main_variant else f" ({variant})")
        ax1.plot(x, [100 * r["top1_agreement"] for r in sel], style, marker="o", label=label)
        ax2.plot(x, [r["ppl_delta_pct"] for r in sel], style, marker="o", label=label)
    ax1.axhline(97, color="grey", ls=":", lw=0.8)
    ax1.axvline(20, color="grey", ls=":", lw=0.8)
    ax1.set(xlabel="KV read per decode step (% of dense)", ylabel="top-1 agreement with dense (%)")
    ax2.set(xlabel="KV read per decode step (% of dense)", ylabel="perplexity delta vs dense (%)")
    ax2.set_yscale("symlog", linthresh=1)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Sparse decode attention ({main_variant}), SmolLM2-135M on pydoc_data.topics")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    from ops.bench._report import machine_info, write_report

    p = argparse.ArgumentParser(prog="python -m ops bench sparse-attention", description=__doc__)
    p.add_argument("--model", type=Path, default=default_model_dir())
    p.add_argument("--contexts", default="2048,4096,8128")
    p.add_argument("--budgets", default="0.08,0.12,0.17,0.25,0.35,0.5,1.0")
    p.add_argument("--windows", type=int, default=12, help="text windows (decoded as a batch)")
    p.add_argument("--steps", type=int, default=64, help="teacher-forced decode steps")
    p.add_argument(
        "--variant", default="mean:16:uniform:local", help="summary:sbs:profile[:global|local]"
    )
    p.add_argument(
        "--variants",
        default="oracle:16:uniform:local,mean:8:uniform:local,sparq8:16:uniform:local,"
        "minmax:64:uniform:local,mean:16:seed:local,mean:16:uniform:global",
        help="extra variants, run at --variant-context only ('' for none)",
    )
    p.add_argument("--variant-context", type=int, default=4096)
    p.add_argument("--variant-budgets", default="0.12,0.17,0.25")
    p.add_argument("--sink", type=int, default=64)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--name", default="sparse_attention", help="bench-results/<name>.json")
    args = p.parse_args(argv)
    rows, meta = run(args)
    meta |= machine_info()
    columns = [
        "variant",
        "context",
        "budget",
        "kv_read",
        "kv_read_tokens_only",
        "top1_agreement",
        "ppl_dense",
        "ppl_sparse",
        "ppl_delta_pct",
        "decode_s",
    ]
    write_report(args.name, rows, meta, columns, plot=_plot)
    return 0
