"""Scenario config for the cluster simulator: pydantic v2, loaded from YAML.

A scenario names a model and a device (presets in `presets.py`, or inline), a cluster
(P and D nodes, GPUs, NIC bandwidths), a trace, the policies to compare, and what to
measure (offline JCT, online max rate under an SLO). A `sweep:` block turns one file into a
list of scenarios, each point deep-merged over the base.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from deployments.scheduler.policy import PolicyName
from ops.sim.traces import BENCH_TRACE

DType = Literal["fp32", "bf16", "fp8"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    """What the performance model needs of an architecture (see presets.py derivations)."""

    name: str
    num_layers: int = Field(ge=1)
    params_total: float = Field(gt=0, description="all weights (parameters)")
    params_active: float = Field(gt=0, description="parameters each token multiplies through")
    routed_expert_params: float = Field(default=0.0, ge=0, description="sharded by EP")
    weight_bytes_per_param: float = Field(gt=0)
    compute_dtype: DType = "bf16"
    attn_flops_per_pair: float = Field(gt=0, description="QK+PV FLOPs per query-key pair")
    sparse_topk: int = Field(default=0, ge=0, description="DSA keys per query (0: dense)")
    indexer_flops_per_pair: float = Field(default=0.0, ge=0, description="DSA indexer per pair")
    kv_bytes_per_token: int = Field(gt=0, description="stored / moved KV per token, all layers")
    indexer_bytes_per_token: int = Field(default=0, ge=0, description="HBM only (DSA keys)")
    block_size: int = Field(default=64, ge=1)


class DeviceConfig(Section):
    """One engine's device: a GPU, or one CPU thread of this machine (fitted, calibration.py)."""

    name: str
    peak_flops: dict[DType, float] = Field(description="dense peak FLOP/s per dtype")
    mem_bytes_per_s: float = Field(gt=0, description="HBM (or DRAM copy) bandwidth")
    mem_bytes: float = Field(gt=0, description="device memory (weights + KV)")
    prefill_linear_eff: float = Field(gt=0, le=1)
    prefill_attn_eff: float = Field(gt=0, le=1)
    decode_mem_eff: float = Field(gt=0, le=1)
    decode_per_seq_s: float = Field(default=0.0, ge=0, description="per sequence per step")
    decode_step_overhead_s: float = Field(default=0.0, ge=0)
    prefill_step_overhead_s: float = Field(default=0.0, ge=0)
    decode_combine: Literal["sum", "max"] = Field(
        default="max", description="decode step = memory + compute (CPU) or the max (GPU)"
    )
    copy_bytes_per_s: float | None = Field(
        default=None,
        description="CPU: KV moves are host copies at this rate, added to the engine's work; "
        "None (GPU): they cross the CNICs, overlapped with compute layer by layer",
    )
    prefill_gathers_kv: bool = Field(
        default=False,
        description="every prefill step copies its prompt's whole KV context out of the "
        "paged cache at copy_bytes_per_s (the CPU engine's torch path); GPUs read in place",
    )


class ClusterConfig(Section):
    prefill_nodes: int = Field(ge=1)
    decode_nodes: int = Field(ge=1)
    gpus_per_node: int = Field(default=8, ge=1, description="engines per node (one per GPU)")
    snic_gbps: float | None = Field(default=400.0, gt=0, description="per node; None: uncapped")
    snic_uncapped_bytes_per_s: float = Field(default=1e12, gt=0, description="when uncapped")
    cnic_gbps: float = Field(default=400.0, gt=0, description="per GPU")
    min_write_share: float = Field(default=0.05, ge=0, le=1)
    host_cores: float | None = Field(
        default=None, gt=0, description="all nodes share one CPU host of this many cores"
    )
    background_threads: float = Field(default=0.0, ge=0, description="host cores used by the rest")
    request_overhead_s: float = Field(default=0.0, ge=0, description="per turn, before plan")
    kv_plumbing_bytes_per_s: float | None = Field(
        default=None,
        gt=0,
        description="CPU host: host CPU per KV byte moved outside the engines (store reads "
        "and writes, object-store gets, transport copies); None: the device's copy rate",
    )
    report_interval_s: float = Field(default=0.25, gt=0)
    forgetful_view: bool = Field(
        default=False,
        description="what-if, the view before the fix: the work planned onto an engine or a "
        "SNIC leaves the view at its next report, whether the request reached it or not "
        "(the live view keeps it until a report names the request)",
    )
    stale_after_s: float = Field(default=15.0, gt=0)
    planned_ttl_s: float = Field(
        default=60.0,
        gt=0,
        description="the view drops planned work no report named by then (live default)",
    )
    expert_parallel: Literal["role", "node", "none"] = Field(
        default="role", description="routed experts sharded over a role's GPUs, a node, or not"
    )
    max_ep_gpus: int | None = Field(
        default=None, ge=1, description="cap on the expert-parallel group (e.g. 32 GPUs)"
    )
    pe_kv_tokens: int | None = Field(default=None, ge=1, description="None: layer-wise (large)")
    de_kv_tokens: int | None = Field(default=None, ge=1, description="None: from memory")
    max_num_seqs: int = Field(default=256, ge=1, description="decode batch slots per engine")
    max_batched_tokens: int = Field(default=65_536, ge=1, description="prefill tokens per step")
    prefill_quota_s: float | None = Field(default=0.3, gt=0, description="PE compute quota")

    @property
    def snic_bytes_per_s(self) -> float | None:
        return None if self.snic_gbps is None else self.snic_gbps * 1e9 / 8

    @property
    def cnic_bytes_per_s(self) -> float:
        return self.cnic_gbps * 1e9 / 8


class TraceConfig(Section):
    preset: Literal["32k", "48k", "64k", "bench"] = "64k"
    agents: int = Field(default=64, ge=1)
    window_turns: int | None = Field(default=None, ge=1, description="turns per agent window")
    warmup_turns: int = Field(default=0, ge=0, description="untimed turns before JCT starts")
    seed: int = 0
    # the one-machine benchmark's make_trace arguments (preset "bench")
    turns: int = BENCH_TRACE["turns"]
    context: int = BENCH_TRACE["context"]
    append: int = BENCH_TRACE["append"]
    gen: int = BENCH_TRACE["gen"]


class OnlineConfig(Section):
    slo_ttft_s: float = 4.0
    slo_tpot_ms: float = 50.0
    statistic: Literal["mean", "p50", "p90"] = Field(
        default="mean", description="of the turns that arrive in the measured window"
    )
    duration_s: float = Field(default=400.0, gt=0, description="agents arrive during this")
    warmup_s: float = Field(default=100.0, ge=0, description="turns before this are not scored")
    rate_lo: float = Field(default=0.05, gt=0, description="agents/s, full trajectories")
    rate_hi: float = Field(default=2.0, gt=0)
    probes: int = Field(default=7, ge=2, description="bisection steps (log scale)")
    fixed_rate: float | None = Field(
        default=None, gt=0, description="no search: TTFT / TPOT at this one rate (agents/s)"
    )


class PolicySection(Section):
    names: list[PolicyName] = Field(
        default_factory=lambda: ["single_path", "dualpath", "dualpath_split"]
    )
    alpha_s: float = 3.0
    beta_s: float = 5.0
    z_factor: float = 1.05
    prefill_tokens_per_s: float | None = Field(
        default=None, gt=0, description="a PE's rate until measured; None: the live default"
    )
    forward_bytes_per_s: float | None = Field(
        default=None,
        gt=0,
        description="the DE -> PE forwarding rate the policy charges a decode-side read "
        "(scheduler.forward_bytes_per_s); None: the CNIC rate on GPUs (path B's KV crosses "
        "the CNICs), the live default on a CPU device",
    )
    oracle: bool = Field(default=False, description="also run dualpath with uncapped SNICs")


class Scenario(Section):
    name: str
    description: str = ""
    model: str | ModelConfig = "ds-660b"
    device: str | DeviceConfig = "hopper"
    cluster: ClusterConfig
    trace: TraceConfig = Field(default_factory=TraceConfig)
    policy: PolicySection = Field(default_factory=PolicySection)
    offline: bool = True
    online: OnlineConfig | None = None
    index: Literal["exact", "compact"] = Field(
        default="compact",
        description="exact: kvstore.index.KVIndex with 16-byte keys; compact: a bitmap per "
        "agent behind the same longest_prefix contract (memory for large runs)",
    )
    label: str = Field(default="", description="this point's name within a sweep")

    @model_validator(mode="after")
    def _check(self) -> Scenario:
        if self.online is not None and self.online.rate_hi <= self.online.rate_lo:
            raise ValueError("online.rate_hi must exceed online.rate_lo")
        return self


class SweepFile(Section):
    """A scenario file: one scenario, or a base plus `sweep.points` (deep-merged overrides)."""

    name: str
    label_key: str = Field(default="label", description="x axis of the sweep's plot")
    points: list[dict[str, Any]]


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_scenarios(path: Path | str) -> tuple[list[Scenario], SweepFile | None]:
    """The scenario(s) of a YAML file: [one] or every sweep point, plus the sweep itself.

    Raises:
        pydantic.ValidationError: a field is missing or wrong (reported with its path).
    """
    raw = yaml.safe_load(Path(path).read_text())
    sweep_raw = raw.pop("sweep", None)
    if sweep_raw is None:
        return [Scenario.model_validate(raw)], None
    sweep = SweepFile.model_validate(sweep_raw)
    scenarios = [Scenario.model_validate(_merge(raw, point)) for point in sweep.points]
    return scenarios, sweep
