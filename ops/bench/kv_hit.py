"""Turn TTFT with a KV hit vs recompute, and the layer-wise import overlap.

    python -m ops bench kv-hit [--context 8000]   (also part of `bench agentic`)

One engine in this process (2 threads, prefix cache off), a real-text context (pydoc
topics) of `--context` tokens plus 128 appended: TTFT recomputing everything vs TTFT with
the context's blocks read back from real NVMe-tier files (checksums verified, SNIC
uncapped) and imported layer by layer while the 128 new tokens compute.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from engine.config import default_model_dir


def kv_hit_ttft(model: Path, hit_context: int) -> dict[str, Any]:
    """Turn TTFT with the context's KV read from the NVMe tier vs recomputing it, in-process
    (one engine, real block files, no SNIC cap), plus the layer-wise import overlap."""
    from pydoc_data.topics import topics

    from engine import EngineConfig, EngineCore, EngineRequest, SamplingParams
    from engine.kv_import import ImportStats, PrefixKV
    from kvstore.snic import StorageNIC
    from kvstore.store import TieredStore
    from kvstore.tiers.dram import DRAMTier
    from kvstore.tiers.nvme import NVMeTier

    engine = EngineCore(
        EngineConfig(
            model=model, num_threads=2, enable_prefix_caching=False, kv_cache_bytes=640 << 20
        )
    )
    text = " ".join(v for _, v in sorted(topics.items()))
    ids = engine.tokenizer.encode(text)
    context, append = ids[:hit_context], ids[hit_context : hit_context + 128]
    one = SamplingParams(temperature=0, max_tokens=1)

    def ttft(rid: str, prompt: list[int], prefix: PrefixKV | None = None) -> float:
        start = time.perf_counter()
        engine.add_request(EngineRequest(rid, prompt, one, prefix=prefix))
        while engine.has_unfinished():
            engine.step()
        return time.perf_counter() - start

    recompute_s = ttft("recompute", context + append)
    engine.add_prefill(EngineRequest("store", context, SamplingParams(temperature=0, max_tokens=2)))
    kv = None
    while engine.has_unfinished():
        for out in engine.step():
            kv = out.kv or kv
    assert kv is not None
    bs = engine.config.block_size
    root = Path(tempfile.mkdtemp(prefix="dps-kv-hit-"))
    try:
        block_nbytes = kv.data[0].numel() * kv.data.element_size()
        store = TieredStore(
            "n0",
            DRAMTier(0, block_nbytes),
            NVMeTier(root, fsync=False),
            StorageNIC("n0", num_workers=2),
            wrap=lambda t: t,
            unwrap=lambda t: t,
            block_size=bs,
            block_nbytes=block_nbytes,
        )
        for key, block in zip(kv.block_keys, kv.data.unbind(0), strict=False):
            store.persist(key, block)
        store.flush()
        before = ImportStats()
        before.add(engine.import_totals)
        start = time.perf_counter()
        blocks = store.load(kv.block_keys)
        read_s = time.perf_counter() - start
        hit_s = read_s + ttft("hit", context + append, PrefixKV(kv.block_keys, blocks))
        store.snic.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    after = engine.import_totals
    copy_s, wait_s = after.copy_s - before.copy_s, after.wait_s - before.wait_s
    return {
        "context_tokens": len(context),
        "append_tokens": len(append),
        "hit_blocks": len(blocks),
        "recompute_ttft_s": round(recompute_s, 3),
        "hit_ttft_s": round(hit_s, 3),
        "hit_read_s": round(read_s, 3),
        "speedup": round(recompute_s / hit_s, 1),
        "import_copy_ms": round(copy_s * 1e3, 1),
        "import_wait_ms": round(wait_s * 1e3, 1),
        "import_overlap": round(1 - min(1.0, wait_s / copy_s), 2) if copy_s else None,
    }


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    from ops.bench._report import machine_info

    p = argparse.ArgumentParser(prog="python -m ops bench kv-hit", description=__doc__)
    p.add_argument("--model", type=Path, default=default_model_dir())
    p.add_argument("--context", type=int, default=8000)
    args = p.parse_args(argv)
    result = kv_hit_ttft(args.model, args.context)
    Console().print({"machine": machine_info()["cpu"], "kv_hit_ttft": result})
    return 0
