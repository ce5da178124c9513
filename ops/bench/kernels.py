"""Sparse vs dense decode attention step time, and achieved memory bandwidth (GPU bench).

    python -m ops bench kernels [--contexts 8192,16384,32768,65536] [--backend cuda]

One attention layer's decode step, as the engine runs it (`engine.layers.attention.
paged_attention`: write the new K/V, then attend through the block table), for a batch of
`--batch` sequences of each context length in a paged bf16 cache with a scattered block
table. Dense is the engine's dense decode path; sparse is the same call with a
SparseContext (mean ranking, `--fraction` token budget), through `--backend` (`cuda`: the
compiled kernels; `reference`: torch ops on the same device, the baseline they replace).

Reported per context: step time (median of `--iters`, CUDA events on a GPU), the bytes each
path must read (K+V of the tokens attended, plus summaries for sparse) over the time, and
the device's copy bandwidth measured in the same run (a large device-to-device copy, bytes
read + written), so `bw_vs_copy` says how close each path runs to the memory system.

NOTE: written without a GPU (none was lent to issue 6): only `--device cpu` has run (the
harness smoke test in tests/ops/test_bench_kernels.py). The GPU numbers are still to come.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

COLUMNS = [
    "context",
    "path",
    "step_ms",
    "speedup",
    "kv_read_frac",
    "bytes_read_mb",
    "achieved_gbps",
    "copy_gbps",
    "bw_vs_copy",
]


def _timer(device: torch.device, fn: Callable[[], Any], iters: int) -> float:
    """Median seconds of `fn` after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int, iters: int) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _timer(device, lambda: dst.copy_(src), iters)


def _case(args: argparse.Namespace, context: int, device: torch.device) -> list[dict[str, Any]]:
    from engine.forward_context import AttentionMetadata, SparseContext
    from engine.kernels import ops
    from engine.kernels.sparse_attention import SparseSpec, SparseStats
    from engine.layers.attention import paged_attention

    dtype = getattr(torch, args.dtype)
    bs, kvh, d, heads, batch = args.block_size, args.kv_heads, args.head_dim, args.heads, args.batch
    per_seq = -(-(context + 1) // bs)
    num_blocks = batch * per_seq
    g = torch.Generator().manual_seed(context)
    cache = torch.randn(2, num_blocks, bs, kvh, d, generator=g).to(device, dtype)
    tables = torch.randperm(num_blocks, generator=g).view(batch, per_seq).to(device)
    spec = SparseSpec((args.fraction,), 64, 64, args.score_block_size, "mean")
    summaries = torch.zeros(num_blocks * bs // spec.score_block_size, 1, kvh, d, dtype=dtype)
    summaries = summaries.to(device)
    all_sub = torch.arange(summaries.shape[0], device=device)
    ops.update_summaries(cache, summaries, all_sub, spec, backend=args.backend)
    q = torch.randn(batch, heads, d, generator=g).to(device, dtype)
    k = torch.randn(batch, kvh, d, generator=g).to(device, dtype)
    slots = tables[:, context // bs] * bs + context % bs
    lens = torch.full((batch,), context + 1, device=device)
    meta = AttentionMetadata(
        slots,
        decode_token_idx=torch.arange(batch, device=device),
        decode_block_tables=tables,
        decode_context_len=context + 1,
        decode_context_lens=lens,
        filled_sub_blocks=torch.empty(0, dtype=torch.long, device=device),
    )
    scale = d**-0.5
    stats = SparseStats.zeros(1, device)
    sparse = SparseContext(spec, [summaries], stats)
    backend_env = {"DUALPATH_KERNELS": args.backend}

    def dense() -> Any:
        return paged_attention(q, k, k, cache, meta, scale)

    def sparse_step() -> Any:
        return paged_attention(q, k, k, cache, meta, scale, sparse, 0)

    saved = {key: os.environ.get(key) for key in backend_env}
    os.environ.update(backend_env)
    try:
        dense_s = _timer(device, dense, args.iters)
        sparse_s = _timer(device, sparse_step, args.iters)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    itemsize = cache.element_size()
    dense_bytes = batch * (context + 1) * kvh * d * 2 * itemsize
    frac = stats.kv_fraction(include_summaries=True)
    rows = []
    for path, seconds, nbytes in (
        ("dense", dense_s, dense_bytes),
        (f"sparse-{args.backend}", sparse_s, dense_bytes * frac),
    ):
        rows.append(
            {
                "context": context,
                "path": path,
                "step_ms": round(seconds * 1e3, 4),
                "speedup": round(dense_s / seconds, 2),
                "kv_read_frac": round(nbytes / dense_bytes, 3),
                "bytes_read_mb": round(nbytes / 2**20, 1),
                "achieved_gbps": round(nbytes / seconds / 1e9, 1),
            }
        )
    return rows


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in sorted({r["path"] for r in rows}):
        sel = [r for r in rows if r["path"] == name]
        ax1.plot([r["context"] for r in sel], [r["step_ms"] for r in sel], marker="o", label=name)
        ax2.plot([r["context"] for r in sel], [r["bw_vs_copy"] for r in sel], marker="o")
    ax1.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="decode step (ms)")
    ax2.set(xscale="log", xlabel="context tokens", ylabel="achieved / copy bandwidth")
    ax1.legend()
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    from ops.bench._report import machine_info, write_report

    p = argparse.ArgumentParser(prog="python -m ops bench kernels", description=__doc__)
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", default="cuda", choices=["cuda", "reference", "auto"])
    p.add_argument("--contexts", default="8192,16384,32768,65536")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--score-block-size", type=int, default=16)
    p.add_argument("--fraction", type=float, default=0.17)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--copy-bytes", type=int, default=1 << 30)
    p.add_argument("--name", default="kernels")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            "ops bench kernels: no CUDA device here (use --device cpu for a smoke run)"
        )
    copy_bps = copy_bandwidth(device, args.copy_bytes, args.iters)
    rows: list[dict[str, Any]] = []
    for context in (int(c) for c in args.contexts.split(",")):
        for row in _case(args, context, device):
            row["copy_gbps"] = round(copy_bps / 1e9, 1)
            row["bw_vs_copy"] = round(row["achieved_gbps"] * 1e9 / copy_bps, 3)
            rows.append(row)
    meta = machine_info() | {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "args": vars(args),
    }
    write_report(args.name, rows, meta, COLUMNS, plot=_plot)
    return 0
