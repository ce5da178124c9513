"""Model quality per precision: the quantised engine against the float32 one, same text.

    python -m ops bench quality [--impls fp32,bf16,int8,int4] [--windows 8] [--context 256]
                                [--steps 64] [--threads 2]

Text: Python's own documentation (`pydoc_data.topics`, sorted keys joined by spaces, one
token stream). `--windows` windows of `--context` + `--steps` + 1 tokens, evenly spread over
the stream. Per window, positions 0..C+S-1 are prefilled in one pass; then the S positions
after the context are scored by **teacher-forced decode** in batches of at most
`quant_max_rows` (8) windows: step t feeds token C+t and predicts token C+t+1. Decode is
what serving runs with the weight-only int4/int8 kernels (prefill, with more rows, runs the
dense bf16 copy of the same weights), so the headline numbers come from that path. The same
positions are also read off the prefill pass (`ppl_prefill`), which shows how far the two
paths of one engine drift apart.

Implementations (ops/bench/engine.py IMPLS): fp32, bf16, int8 / int4 (weight-only linears,
bf16 activations and KV, float32 residual stream; int4 reads the GGUF's Q4_1 codes). fp32
is the reference and always runs. NOTE: the default model is converted from that Q4_1 GGUF,
so fp32 runs the very weights int4 runs, dequantised: int4's delta is its kernel and bf16
arithmetic, not 4-bit rounding, while int8 re-rounds those weights per row. Per
implementation:

- `ppl`: perplexity of the true next tokens (decode path), `ppl_delta_pct` vs fp32;
- `top1_agreement_pct`: argmax equal to fp32's argmax at the same position;
- `top1_accuracy_pct`: argmax equal to the true next token;
- `ppl_prefill`, `prefill_agreement_pct`: perplexity and argmax agreement of the prefill
  pass over the same positions (the dense path of the same engine);
- `paris`: the greedy 16-token reply to "What is the capital of France?" contains "Paris".
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from engine import EngineConfig, EngineCore, EngineRequest, SamplingParams
from ops.bench._report import machine_info, write_report
from ops.bench.engine import IMPLS

REFERENCE = "fp32"
SANITY_PROMPT = "What is the capital of France?"
SANITY_WORD = "Paris"
COLUMNS = [
    "impl",
    "ppl",
    "ppl_delta_pct",
    "top1_agreement_pct",
    "top1_accuracy_pct",
    "ppl_prefill",
    "prefill_agreement_pct",
    "paris",
    "answer",
    "score_s",
]


class TeacherForcedEngine:
    """Drives an EngineCore's model directly over its KV cache: one prefill pass per window,
    then teacher-forced decode of a batch of windows (the approach of
    ops/bench/sparse_attention.py `TeacherForced`, dense attention, the engine's own model).

    The block tables are hand-built over the engine's cache; nothing else may run on the
    engine meanwhile (its block manager does not know these blocks are in use).
    """

    def __init__(self, engine: EngineCore):
        self.runner = engine.runner
        self.bs = engine.config.block_size

    def _ctx(self, positions: list[int], meta: Any) -> Any:
        from engine.forward_context import ForwardContext

        return ForwardContext(torch.tensor(positions), None, meta, self.runner.kv_layers)

    @torch.inference_mode()
    def prefill(self, tokens: list[int], table: list[int], num_scored: int) -> torch.Tensor:
        """Prefill `tokens` from position 0 into the blocks of `table`.

        Returns:
            log-probs [num_scored, vocab] of the last `num_scored` tokens' next tokens.
        """
        from engine.forward_context import AttentionMetadata, PrefillSpan

        bs, n = self.bs, len(tokens)
        slots = [table[p // bs] * bs + p % bs for p in range(n)]
        span = PrefillSpan(0, n, n, torch.tensor(table[: -(-n // bs)]), None)
        meta = AttentionMetadata(torch.tensor(slots), prefills=[span])
        hidden = self.runner.model(torch.tensor(tokens), self._ctx(list(range(n)), meta))
        return self.runner.model.compute_logits(hidden[n - num_scored :]).log_softmax(-1)

    @torch.inference_mode()
    def decode_step(self, ids: list[int], tables: list[list[int]], pos: int) -> torch.Tensor:
        """One decode step of every window at position `pos` (token `ids[i]` for window i).

        Returns:
            log-probs [len(ids), vocab] of the next token.
        """
        from engine.forward_context import AttentionMetadata

        bs, num = self.bs, len(ids)
        width = pos // bs + 1
        meta = AttentionMetadata(
            torch.tensor([table[pos // bs] * bs + pos % bs for table in tables]),
            decode_token_idx=torch.arange(num),
            decode_block_tables=torch.tensor([table[:width] for table in tables]),
            decode_context_len=pos + 1,
        )
        hidden = self.runner.model(torch.tensor(ids), self._ctx([pos] * num, meta))
        return self.runner.model.compute_logits(hidden).log_softmax(-1)


def text_windows(tokens: list[int], num_windows: int, length: int) -> list[list[int]]:
    """`num_windows` windows of `length` tokens, evenly spread from the stream's start to
    its end (one window starts at 0)."""
    if length > len(tokens):
        raise SystemExit(f"a window of {length} tokens exceeds the text ({len(tokens)})")
    span = len(tokens) - length
    starts = [i * span // max(1, num_windows - 1) for i in range(num_windows)]
    return [tokens[s : s + length] for s in starts]


def greedy_reply(engine: EngineCore, prompt: str, max_tokens: int) -> str:
    """The engine's greedy reply to one user turn (chat template, generation prompt)."""
    messages = [{"role": "user", "content": prompt}]
    ids = engine.tokenizer.encode_chat(messages, add_generation_prompt=True)
    params = SamplingParams(temperature=0, max_tokens=max_tokens)
    engine.add_request(EngineRequest("quality-sanity", ids, params))
    text = ""
    while engine.has_unfinished():
        for out in engine.step():
            text = out.text
    return text


def score_impl(
    engine: EngineCore,
    windows: list[list[int]],
    context: int,
    steps: int,
    batch: int,
    progress: tqdm,
) -> dict[str, torch.Tensor]:
    """Teacher-forced scores of one engine over every window.

    Returns:
        per scored position ([windows, steps] each): `logprob` and `argmax` of the decode
        path, `prefill_logprob` and `prefill_argmax` of the prefill pass.
    """
    driver = TeacherForcedEngine(engine)
    per_seq = -(-(context + steps) // driver.bs)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(batch)]
    parts: dict[str, list[torch.Tensor]] = {
        "logprob": [],
        "argmax": [],
        "prefill_logprob": [],
        "prefill_argmax": [],
    }
    for first in range(0, len(windows), batch):
        group = windows[first : first + batch]
        group_tables = tables[: len(group)]
        for window, table in zip(group, group_tables, strict=True):
            # NOTE: positions C..C+S-1 are prefilled too (scored on the prefill path); each
            # decode step rewrites its own slot before attending, never past it.
            logp = driver.prefill(window[: context + steps], table, steps)
            true = torch.tensor(window[context + 1 : context + steps + 1])
            parts["prefill_logprob"].append(logp.gather(1, true[:, None])[:, 0])
            parts["prefill_argmax"].append(logp.argmax(-1))
        logprob, argmax = [], []
        for t in range(steps):
            pos = context + t
            logp = driver.decode_step([w[pos] for w in group], group_tables, pos)
            true = torch.tensor([[w[pos + 1]] for w in group])
            logprob.append(logp.gather(1, true)[:, 0])
            argmax.append(logp.argmax(-1))
            progress.update(len(group))
        parts["logprob"].extend(torch.stack(logprob, dim=1))
        parts["argmax"].extend(torch.stack(argmax, dim=1))
    return {name: torch.stack(rows) for name, rows in parts.items()}


def build_engine(impl: str, args: argparse.Namespace, num_blocks: int) -> EngineCore:
    return EngineCore(
        EngineConfig(
            **IMPLS[impl],
            model=args.model,
            num_threads=args.threads,
            num_kv_blocks=num_blocks,
            enable_prefix_caching=False,
        )
    )


def perplexity(logprob: torch.Tensor) -> float:
    return math.exp(-logprob.double().mean().item())


def pct(matches: torch.Tensor) -> float:
    return round(100 * matches.double().mean().item(), 2)


def run(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from pydoc_data.topics import topics

    impls = args.impls.split(",")
    unknown = set(impls) - set(IMPLS)
    if unknown:
        raise SystemExit(f"unknown --impls {sorted(unknown)}; choose from {sorted(IMPLS)}")
    if REFERENCE not in impls:  # every comparison is against it
        impls.insert(0, REFERENCE)
    impls.sort(key=lambda impl: impl != REFERENCE)
    if args.batch < 1:
        raise SystemExit("--batch must be at least 1")
    block_size = EngineConfig.model_fields["block_size"].default
    num_blocks = args.batch * -(-(args.context + args.steps) // block_size) + 4
    rows: list[dict[str, Any]] = []
    reference: dict[str, torch.Tensor] = {}
    windows: list[list[int]] = []
    num_stream_tokens = 0
    progress = tqdm(total=len(impls) * args.windows * args.steps, unit="pos", desc="quality")
    for impl in impls:
        progress.set_description(f"quality {impl}")
        started = time.perf_counter()
        engine = build_engine(impl, args, num_blocks)
        load_s = time.perf_counter() - started
        if engine.config.quantization != "none" and args.batch > engine.config.quant_max_rows:
            raise SystemExit(f"--batch {args.batch} > quant_max_rows: decode would skip {impl}")
        if not windows:
            stream = engine.tokenizer.encode(" ".join(v for _, v in sorted(topics.items())))
            num_stream_tokens = len(stream)
            windows = text_windows(stream, args.windows, args.context + args.steps + 1)
        answer = greedy_reply(engine, SANITY_PROMPT, args.answer_tokens)
        started = time.perf_counter()
        scores = score_impl(engine, windows, args.context, args.steps, args.batch, progress)
        score_s = time.perf_counter() - started
        if impl == REFERENCE:
            reference = scores
        true = torch.tensor([w[args.context + 1 : args.context + args.steps + 1] for w in windows])
        ppl, ref_ppl = perplexity(scores["logprob"]), perplexity(reference["logprob"])
        rows.append(
            {
                "impl": impl,
                "ppl": round(ppl, 4),
                "ppl_delta_pct": round(100 * (ppl / ref_ppl - 1), 2),
                "top1_agreement_pct": pct(scores["argmax"] == reference["argmax"]),
                "top1_accuracy_pct": pct(scores["argmax"] == true),
                "ppl_prefill": round(perplexity(scores["prefill_logprob"]), 4),
                "prefill_agreement_pct": pct(scores["argmax"] == scores["prefill_argmax"]),
                "paris": SANITY_WORD in answer,
                "answer": answer,
                "score_s": round(score_s, 1),
                "load_s": round(load_s, 1),
                "quant_sources": engine.runner.quant_sources,
            }
        )
        tqdm.write(str({k: v for k, v in rows[-1].items() if k != "quant_sources"}))
        del engine
    progress.close()
    meta = {
        "model": str(args.model),
        "text": "pydoc_data.topics (sorted keys, joined by spaces)",
        "num_stream_tokens": num_stream_tokens,
        "windows": args.windows,
        "context": args.context,
        "steps": args.steps,
        "decode_batch": args.batch,
        "samples_per_impl": args.windows * args.steps,
        "reference": REFERENCE,
        "impls": {impl: IMPLS[impl] for impl in impls},
        "sanity_prompt": SANITY_PROMPT,
        "answer_tokens": args.answer_tokens,
        "threads": args.threads,
    }
    return rows, meta


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    names = [r["impl"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.6))
    bars = ax1.bar(names, [r["ppl_delta_pct"] for r in rows], color="tab:red")
    ax1.bar_label(bars, fmt="%.2f")
    ax1.axhline(0, color="grey", lw=0.8)
    ax1.set(ylabel="perplexity vs fp32 (%)", title="perplexity delta (decode)")
    bars = ax2.bar(names, [r["top1_agreement_pct"] for r in rows], color="tab:blue")
    ax2.bar_label(bars, fmt="%.1f")
    low = min(r["top1_agreement_pct"] for r in rows)
    ax2.set_ylim(max(0.0, low - 10), 103)
    ax2.set(ylabel="argmax == fp32 argmax (%)", title="top-1 agreement with fp32")
    for ax in (ax1, ax2):
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Quantisation quality, SmolLM2-135M on pydoc_data.topics")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    from ops.model_fetch import ensure_default_model

    p = argparse.ArgumentParser(prog="python -m ops bench quality", description=__doc__)
    p.add_argument("--model", type=Path, default=None, help="model dir (default: SmolLM2)")
    p.add_argument("--impls", default="fp32,bf16,int8,int4", help=f"of {', '.join(IMPLS)}")
    p.add_argument("--windows", type=int, default=8, help="text windows")
    p.add_argument("--context", type=int, default=256, help="tokens of context per window")
    p.add_argument("--steps", type=int, default=64, help="scored next-token positions")
    p.add_argument(
        "--batch", type=int, default=4, help="windows per decode step (<= quant_max_rows)"
    )
    p.add_argument("--answer-tokens", type=int, default=16, help="sanity reply length")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="quality", help="bench-results/<name>.json")
    args = p.parse_args(argv)
    if args.model is None:
        args.model = ensure_default_model()  # the engine's default model dir
    torch.set_num_threads(args.threads)
    rows, meta = run(args)
    meta |= machine_info()
    write_report(args.name, rows, meta, COLUMNS, plot=_plot)
    return 0
