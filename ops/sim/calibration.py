"""Fit the simulator's CPU device to the real system's own measurements on this machine.

`calibration.yaml` holds the measured points and where each came from (engine, serve and
KV-hit benchmarks; nothing is run here). The fit, per torch thread count:

  prefill  t = L·a + A·b + steps·o + g, least squares over the 2-thread points, where L
           and A are a prompt's linear and attention FLOPs (perf.py): 1/a and 1/b are the
           effective FLOP/s, o the per-step overhead; g (not fitted) is the copy of the
           prompt's KV out of the paged cache every step, at the measured copy rate. One
           thread runs s times slower, s from the 1-thread point.
  decode   t = bytes/(copy bandwidth · η) + B·(token FLOPs · a·s + c): memory efficiency η
           and per-sequence cost c, least squares over the 2-thread batch sweep; η again
           for one thread from its single point.

`fit_cpu_device(threads)` turns the fit into a DeviceConfig; `calibration_rows()` compares
every point (fitted and held out) with what the fitted model predicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ops.sim.config import DeviceConfig
from ops.sim.perf import PerfModel, engine_weight_bytes
from ops.sim.presets import resolve_model

CALIBRATION_FILE = Path(__file__).with_name("calibration.yaml")


@dataclass(frozen=True, slots=True)
class CpuFit:
    per_core_flops: float
    copy_bytes_per_s: float
    s_per_linear_flop: float  # a, at 2 threads
    s_per_attn_flop: float  # b, at 2 threads
    step_overhead_s: float  # o
    thread_slowdown: dict[int, float]  # s per thread count (2 -> 1.0)
    decode_mem_eff: dict[int, float]
    decode_per_seq_s: dict[int, float]
    host_copy_bytes_per_s: float
    storage_read_bytes_per_s: float
    request_overhead_s: float


def load_measurements(path: Path = CALIBRATION_FILE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _prefill_features(
    perf: PerfModel, point: dict[str, Any], copy_bytes_per_s: float
) -> tuple[float, float, int, float]:
    """(linear FLOPs, attention FLOPs, steps, KV-gather seconds) of one measured prefill:
    each step copies its prompt's KV so far out of the paged cache (engine/layers/attention.py
    `_gather_kv`), at the measured host copy rate."""
    cached, new = point["cached"], point["new"]
    chunk = point.get("chunk") or new
    linear = attn = gather = 0.0
    steps = 0
    done = 0
    while done < new:
        n = min(chunk, new - done)
        lin, att = perf.prefill_flops(cached + done, n)
        linear, attn, steps, done = linear + lin, attn + att, steps + 1, done + n
        gather += (cached + done) * perf.model.kv_bytes_per_token / copy_bytes_per_s
    return linear, attn, steps, gather


@cache
def fit(path: Path = CALIBRATION_FILE) -> CpuFit:
    meas = load_measurements(path)
    machine = meas["machine"]
    model = resolve_model(meas["model"])
    weights = engine_weight_bytes(model, 1)
    # a throwaway device: only the FLOP arithmetic of PerfModel is used for the features
    probe = PerfModel(model, _device(1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1e10, 1e9), weights)
    host_copy = float(meas["io"]["host_copy_bytes_per_s"])
    fitted = [p for p in meas["prefill"] if p.get("fit", True)]
    two = [
        _prefill_features(probe, p, host_copy) + (p["seconds"],)
        for p in fitted
        if p["threads"] == 2
    ]
    x = np.array([f[:3] for f in two])
    y = np.array([f[4] - f[3] for f in two])
    (a, b, o), *_ = np.linalg.lstsq(x, y, rcond=None)
    slowdown = {2: 1.0}
    for p in fitted:
        if p["threads"] != 2:
            lin, att, steps, gather = _prefill_features(probe, p, host_copy)
            slowdown[p["threads"]] = (p["seconds"] - steps * o - gather) / (lin * a + att * b)
    copy_bw = float(machine["copy_bytes_per_s"])
    mem_eff: dict[int, float] = {}
    per_seq: dict[int, float] = {}
    for threads in sorted({p["threads"] for p in meas["decode"]}, reverse=True):
        points = [p for p in meas["decode"] if p["threads"] == threads]
        s = slowdown.get(threads, 1.0)
        rows, ys = [], []
        for p in points:
            batch, ctx = p["batch"], p["context"]
            mem_s = (weights + batch * probe.decode_kv_read_bytes(ctx)) / copy_bw
            compute_s = batch * probe.decode_token_flops(ctx) * a * s
            rows.append((mem_s, batch))
            ys.append(p["step_s"] - compute_s)
        if len(points) >= 2:
            (inv_eff, c), *_ = np.linalg.lstsq(np.array(rows), np.array(ys), rcond=None)
        else:  # one point: the per-sequence cost scales with the thread slowdown
            c = per_seq[2] * s
            inv_eff = (ys[0] - rows[0][1] * c) / rows[0][0]
        mem_eff[threads], per_seq[threads] = 1.0 / inv_eff, max(0.0, float(c))
    io = meas["io"]
    return CpuFit(
        per_core_flops=machine["clock_ghz"] * 1e9 * machine["fp32_flops_per_cycle"],
        copy_bytes_per_s=copy_bw,
        s_per_linear_flop=float(a),
        s_per_attn_flop=float(b),
        step_overhead_s=max(0.0, float(o)),
        thread_slowdown={k: float(v) for k, v in slowdown.items()},
        decode_mem_eff={k: float(v) for k, v in mem_eff.items()},
        decode_per_seq_s={k: float(v) for k, v in per_seq.items()},
        host_copy_bytes_per_s=float(io["host_copy_bytes_per_s"]),
        storage_read_bytes_per_s=float(io["storage_read_bytes_per_s"]),
        request_overhead_s=float(io["request_overhead_s"]),
    )


def _device(
    peak: float,
    lin_eff: float,
    attn_eff: float,
    mem_eff: float,
    per_seq: float,
    overhead: float,
    copy_bw: float,
    host_copy: float,
) -> DeviceConfig:
    return DeviceConfig(
        name="cpu",
        peak_flops={"fp32": peak, "bf16": peak, "fp8": peak},
        mem_bytes_per_s=copy_bw,
        mem_bytes=24e9,
        prefill_linear_eff=min(1.0, lin_eff),
        prefill_attn_eff=min(1.0, attn_eff),
        decode_mem_eff=min(1.0, mem_eff),
        decode_per_seq_s=per_seq,
        prefill_step_overhead_s=overhead,
        decode_combine="sum",
        copy_bytes_per_s=host_copy,
        prefill_gathers_kv=True,
    )


def fit_cpu_device(threads: int) -> DeviceConfig:
    """This machine's engine with `threads` torch threads, as fitted.

    Raises:
        ValueError: no measurement at that thread count.
    """
    f = fit()
    if threads not in f.thread_slowdown or threads not in f.decode_mem_eff:
        raise ValueError(f"no calibration points at {threads} thread(s)")
    s = f.thread_slowdown[threads]
    peak = threads * f.per_core_flops
    return _device(
        peak,
        1.0 / (f.s_per_linear_flop * s) / peak,
        1.0 / (f.s_per_attn_flop * s) / peak,
        f.decode_mem_eff[threads],
        f.decode_per_seq_s[threads],
        f.step_overhead_s,
        f.copy_bytes_per_s,
        f.host_copy_bytes_per_s,
    ).model_copy(update={"name": f"cpu-{threads}t"})


def calibration_rows() -> list[dict[str, Any]]:
    """Every measured point against the fitted model's prediction."""
    meas = load_measurements()
    model = resolve_model(meas["model"])
    weights = engine_weight_bytes(model, 1)
    rows: list[dict[str, Any]] = []
    for p in meas["prefill"]:
        perf = PerfModel(model, fit_cpu_device(p["threads"]), weights)
        chunk = p.get("chunk") or p["new"]
        predicted = 0.0
        for start in range(0, p["new"], chunk):
            n = min(chunk, p["new"] - start)
            predicted += perf.prefill_s([(p["cached"] + start, n)])
        what = f"prefill {p['cached']}+{p['new']}" + (f" /{chunk}" if chunk < p["new"] else "")
        rows.append(_row(what, p, p["seconds"], predicted))
    for p in meas["decode"]:
        perf = PerfModel(model, fit_cpu_device(p["threads"]), weights)
        predicted = perf.decode_step_s([p["context"]] * p["batch"])
        rows.append(_row(f"decode bs{p['batch']} ctx{p['context']}", p, p["step_s"], predicted))
    return rows


def _row(what: str, p: dict[str, Any], measured: float, predicted: float) -> dict[str, Any]:
    return {
        "point": what,
        "threads": p["threads"],
        "fitted": p.get("fit", True),
        "measured_s": measured,
        "predicted_s": round(predicted, 4),
        "error": round(predicted / measured - 1, 4),
        "source": p["source"],
    }
