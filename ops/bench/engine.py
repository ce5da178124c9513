"""Engine throughput vs Hugging Face transformers, same machine, same weights, one run.

    python -m ops bench engine [--dtype float32] [--threads 2] [--batches 1,8,32]

Decode: B prompts of --prompt-tokens real English tokens (pydoc topics), --decode-tokens
generated each with EOS ignored. Ours: time only the steps after every sequence has its
first token (prefill excluded). HF: generate(N) - generate(1) on the same left-padded batch.
Prefill: one --prefill-tokens prompt to its first token (ours: one step; also a 512-token
chunked variant; HF: generate(max_new_tokens=1)). Prefix caching is off so nothing is reused.
Roofline: bytes a decode step must read (all weights once + the batch's KV) over this
machine's measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Any

import torch
from tqdm import tqdm

from engine import EngineConfig, EngineCore, EngineRequest, SamplingParams
from ops.bench._report import machine_info, measure_copy_bandwidth_gbps, write_report

logger = logging.getLogger(__name__)
COLUMNS = [
    "workload",
    "impl",
    "tokens_per_s",
    "steps_per_s",
    "roofline_frac",
    "vs_hf",
    "target",
    "status",
    "spread",
]


def _corpus_tokens(engine: EngineCore) -> list[list[int]]:
    from pydoc_data.topics import topics

    docs = [engine.tokenizer.encode(text) for _, text in sorted(topics.items())]
    return [d for d in docs if len(d) >= 64]


def _ours_decode(engine: EngineCore, prompts: list[list[int]], n: int) -> tuple[float, int]:
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(EngineRequest(f"bench-{i}", p, params))
    started: set[str] = set()
    while len(started) < len(prompts):  # prefill (not timed)
        started |= {o.request_id for o in engine.step()}
    t0, steps = time.perf_counter(), 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    return time.perf_counter() - t0, steps


def _hf_generate_s(hf, prompts: list[list[int]], n: int, pad_id: int) -> float:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    t0 = time.perf_counter()
    with torch.inference_mode():
        hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=pad_id,
        )
    return time.perf_counter() - t0


def _ours_prefill_s(engine: EngineCore, prompt: list[int], budget: int) -> float:
    saved = engine.scheduler.max_num_batched_tokens
    engine.scheduler.max_num_batched_tokens = budget
    try:
        t0 = time.perf_counter()
        engine.add_request(
            EngineRequest("prefill", prompt, SamplingParams(temperature=0, max_tokens=1))
        )
        while engine.has_unfinished():
            engine.step()
        return time.perf_counter() - t0
    finally:
        engine.scheduler.max_num_batched_tokens = saved


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    engine = EngineCore(
        EngineConfig(
            dtype=args.dtype,
            num_threads=args.threads,
            max_num_seqs=max(batches),
            max_num_batched_tokens=max(2048, args.prefill_tokens),
            enable_prefix_caching=False,
        )
    )
    hf = (
        None
        if args.skip_hf
        else AutoModelForCausalLM.from_pretrained(
            str(engine.config.model), dtype=engine.config.torch_dtype
        ).eval()
    )
    mc = engine.model_config
    itemsize = engine.config.torch_dtype.itemsize
    weight_bytes = engine.runner.weight_bytes
    kv_per_token = mc.num_hidden_layers * 2 * mc.num_kv_heads * mc.head_size * itemsize
    bw = measure_copy_bandwidth_gbps()
    docs = _corpus_tokens(engine)
    pad = engine.tokenizer.eos_token_ids[0]
    rows: list[dict[str, Any]] = []
    n, plen = args.decode_tokens, args.prompt_tokens

    for b in tqdm(batches, desc="decode batches"):
        prompts = [docs[i % len(docs)][:plen] for i in range(b)]
        _ours_decode(engine, [p[:16] for p in prompts], 4)  # warm-up
        if hf is not None:
            _hf_generate_s(hf, [p[:16] for p in prompts], 2, pad)
        ours_rates, hf_rates = [], []
        for _ in range(args.repeats):  # interleaved, so drift on the machine hits both
            secs, steps = _ours_decode(engine, prompts, n)
            ours_rates.append(steps / secs)
            if hf is not None:
                full = _hf_generate_s(hf, prompts, n, pad)
                first = _hf_generate_s(hf, prompts, 1, pad)
                hf_rates.append((n - 1) / max(full - first, 1e-9))
        kv_bytes = b * (plen + n / 2) * kv_per_token
        roof = bw * 1e9 / (weight_bytes + kv_bytes)
        steps_s = statistics.median(ours_rates)
        ours = {
            "workload": f"decode bs{b}",
            "impl": "dualpath",
            "steps_per_s": steps_s,
            "tokens_per_s": b * steps_s,
            "roofline_frac": steps_s / roof,
            "spread": _spread(ours_rates),
        }
        rows.append(ours)
        if hf is not None:
            hf_steps = statistics.median(hf_rates)
            rows.append(
                {
                    "workload": f"decode bs{b}",
                    "impl": "hf-transformers",
                    "steps_per_s": hf_steps,
                    "tokens_per_s": b * hf_steps,
                    "roofline_frac": hf_steps / roof,
                    "spread": _spread(hf_rates),
                }
            )
            ours["vs_hf"] = ours["tokens_per_s"] / rows[-1]["tokens_per_s"]
            target = 1.0 if b == 1 else 2.0
            ours["target"] = f">={target:g}x hf" + (", >=70% roof" if b == 1 else "")
            ok = ours["vs_hf"] >= target and (b != 1 or ours["roofline_frac"] >= 0.7)
            ours["status"] = "PASS" if ok else "MISS"

    long_doc = [t for d in docs for t in d]
    warm, prompt = long_doc[: args.prefill_tokens], long_doc[-args.prefill_tokens :]
    non_embed = weight_bytes // itemsize - mc.vocab_size * mc.hidden_size
    t = args.prefill_tokens
    flops = 2 * non_embed * t + 2 * mc.num_hidden_layers * t * t * mc.hidden_size
    _ours_prefill_s(engine, warm, args.prefill_tokens)
    if hf is not None:
        _hf_generate_s(hf, [warm], 1, pad)
    timings: dict[str, list[float]] = {}
    variants = ((f"prefill {t}", t), (f"prefill {t} (512-token chunks)", 512))
    for _ in range(args.repeats):
        for label, budget in variants:
            timings.setdefault(label, []).append(_ours_prefill_s(engine, prompt, budget))
        if hf is not None:
            timings.setdefault("hf", []).append(_hf_generate_s(hf, [prompt], 1, pad))
    hf_rate = t / statistics.median(timings["hf"]) if hf is not None else None
    for label, _ in variants:
        rate = t / statistics.median(timings[label])
        rows.append(
            {
                "workload": label,
                "impl": "dualpath",
                "tokens_per_s": rate,
                "gflops": flops * rate / t / 1e9,
                "vs_hf": rate / hf_rate if hf_rate else None,
                "spread": _spread([t / x for x in timings[label]]),
            }
        )
    if hf_rate is not None:
        rows.append(
            {
                "workload": f"prefill {t}",
                "impl": "hf-transformers",
                "tokens_per_s": hf_rate,
                "gflops": flops * hf_rate / t / 1e9,
                "spread": _spread([t / x for x in timings["hf"]]),
            }
        )
    args.meta = {
        **machine_info(),
        "dtype": args.dtype,
        "copy_bandwidth_gbps": bw,
        "weight_bytes": weight_bytes,
        "kv_bytes_per_token": kv_per_token,
        "prompt_tokens": plen,
        "decode_tokens": n,
        "prefill_tokens": t,
        "repeats": args.repeats,
    }
    return rows


def _spread(rates: list[float]) -> str:
    """min-max of the repeats, as a fraction of the median (how noisy the machine was)."""
    med = statistics.median(rates)
    return f"{(min(rates) - med) / med:+.0%}/{(max(rates) - med) / med:+.0%}"


def _plot(rows: list[dict[str, Any]], path) -> None:
    import matplotlib.pyplot as plt

    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(impls)
    panels = (
        ("tokens_per_s", "tokens/s", lambda w: True),
        ("roofline_frac", "decode: fraction of memory roofline", lambda w: "decode" in w),
    )
    for ax, (key, title, keep) in zip(axes, panels, strict=True):
        workloads = [w for w in dict.fromkeys(r["workload"] for r in rows) if keep(w)]
        for k, impl in enumerate(impls):
            vals = [
                next((r.get(key) or 0 for r in rows if r["workload"] == w and r["impl"] == impl), 0)
                for w in workloads
            ]
            ax.bar([i + k * width for i in range(len(workloads))], vals, width, label=impl)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(workloads))])
        ax.set_xticklabels(workloads, rotation=20, ha="right", fontsize=8)
        ax.set_title(title)
        ax.legend()
    axes[1].axhline(0.7, color="grey", linestyle="--", linewidth=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ops bench engine",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--prefill-tokens", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs (median)")
    parser.add_argument("--skip-hf", action="store_true", help="ours only (no baseline)")
    parser.add_argument("--name", default="engine", help="output file stem")
    parser.add_argument("--strict", action="store_true", help="exit 1 if a target is missed")
    args = parser.parse_args(argv)
    rows = run(args)
    write_report(args.name, rows, args.meta, COLUMNS + ["gflops"], _plot)
    return 1 if any(r.get("status") == "MISS" for r in rows) and args.strict else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    raise SystemExit(main())
