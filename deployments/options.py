"""Options of the deployment shells, validated once (pydantic v2, frozen, extra="forbid").

`app.config.AppConfig` composes these sections; the builder hands each shell only its own.
Byte sizes accept integers or strings such as "256MiB" / "2GB".
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from engine import env
from engine.config import (
    DType,
    EngineConfig,
    SparseAttentionConfig,
    SpeculativeConfig,
    check_speculation_attention,
    default_model_dir,
)
from engine.quant import Quantization
from kvstore.transfer.base import TransportName

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20}
_UNITS |= {"gib": 2**30, "tb": 10**12, "tib": 2**40}


def parse_bytes(value: int | str) -> int:
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a byte size: {value!r} (examples: 1048576, '256MiB', '2GB')")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


Bytes = Annotated[int, BeforeValidator(parse_bytes), Field(gt=0)]
ZeroOrBytes = Annotated[int, BeforeValidator(parse_bytes), Field(ge=0)]


def default_kvstore_dir() -> Path:
    """`$DUALPATH_KV_DIR`, else ~/.cache/dualpath-serve/kvstore."""
    return env.kvstore_dir() or Path.home() / ".cache" / "dualpath-serve" / "kvstore"


class KVFailurePolicy(StrEnum):
    """What a request does when KV it was planned to get cannot be had (a failed PE→DE
    transfer, a stored-KV read that fails or comes back short). Never partial KV."""

    RECOMPUTE = "recompute"  # compute the missing KV again, from the first bad block
    FAIL = "fail"  # fail the request


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(Section):
    path: Path = Field(default_factory=default_model_dir, description="HF-style model dir")
    served_model_name: str | None = Field(
        default=None, description="the `model` clients send; default: the directory name"
    )

    @property
    def name(self) -> str:
        return self.served_model_name or self.path.expanduser().name


class EngineSection(Section):
    """Knobs shared by prefill and decode engines (each replica builds an EngineConfig)."""

    dtype: DType = Field(default="float32", description="activations and dense weights")
    quantization: Quantization = Field(
        default="none", description="weight-only linears on CPU (int4: a GGUF's Q4_1 codes)"
    )
    quant_max_rows: int = Field(
        default=8, ge=0, description="matmuls of more tokens use the dense bf16 copy"
    )
    kv_dtype: DType | None = Field(default=None, description="KV cache dtype (None: dtype)")
    device: str = Field(default="cpu", description="'cpu' or 'cuda' (Ray sets the visible GPU)")
    block_size: int = Field(default=64, ge=1)
    kv_cache_bytes: Bytes = Field(default=256 * 2**20, description="KV pool per engine")
    max_num_seqs: int = Field(default=64, ge=1)
    max_num_batched_tokens: int = Field(default=2048, ge=1)
    max_model_len: int | None = Field(default=None, ge=1)
    prefill_quota_s: float | None = Field(
        default=0.3, gt=0, description="PE compute quota per step (the paper's 300 ms)"
    )
    enable_prefix_caching: bool = True
    num_threads: int | None = Field(
        default=None, ge=1, description="torch threads; default: the replica's num_cpus"
    )
    num_cpus: float = Field(
        default=1.0, ge=0, description="CPUs Ray reserves per engine replica (0: oversubscribe)"
    )
    attention: Literal["dense", "sparse"] = Field(
        default="dense", description="decode engines' attention (prefill is always dense)"
    )
    sparse: SparseAttentionConfig = Field(default_factory=SparseAttentionConfig)
    speculative: SpeculativeConfig = Field(
        default_factory=SpeculativeConfig,
        description="decode engines' speculative decoding (ngram | suffix; prefill engines "
        "never draft)",
    )

    @model_validator(mode="after")
    def _check_speculative(self) -> EngineSection:
        check_speculation_attention(self.speculative, self.attention)
        return self

    def engine_config(
        self, model: ModelSection, num_threads: int | None, prefill: bool = False
    ) -> EngineConfig:
        return EngineConfig(
            model=model.path.expanduser(),
            dtype=self.dtype,
            quantization=self.quantization,
            quant_max_rows=self.quant_max_rows,
            kv_dtype=self.kv_dtype,
            device=self.device,
            block_size=self.block_size,
            kv_cache_bytes=self.kv_cache_bytes,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            prefill_quota_s=self.prefill_quota_s if prefill else None,
            enable_prefix_caching=self.enable_prefix_caching,
            num_threads=self.num_threads or num_threads,
            attention="dense" if prefill else self.attention,
            sparse=self.sparse,
            speculative=SpeculativeConfig() if prefill else self.speculative,
        )


class TransferSection(Section):
    transport: TransportName = Field(
        default="auto", description="PE→DE KV transport: nixl, object_store, or auto"
    )
    nixl_staging_bytes: Bytes = Field(default=256 * 2**20, description="per-engine NIXL pool")
    lease_s: float = Field(
        default=60.0,
        gt=30.0,
        description="a PE holds KV staged for a DE this long after the DE's last renewal "
        "(the DE renews while it waits to read); then frees it and the DE recomputes",
    )
    on_failure: KVFailurePolicy = Field(
        default=KVFailurePolicy.RECOMPUTE,
        description="a PE→DE KV transfer that fails: the DE recomputes the KV (continuing "
        "from the PE's first token), or the request fails",
    )


class KVStoreSection(Section):
    """The tiered KV store: DRAM on each node's object store, NVMe files behind each SNIC."""

    enabled: bool = Field(default=True, description="off: no stored-KV reads or persistence")
    path: Path = Field(
        default_factory=default_kvstore_dir,
        description="NVMe tier directory (a local disk, or a mount shared by all nodes)",
    )
    dram_bytes: ZeroOrBytes = Field(
        default=256 * 2**20, description="DRAM tier per node (0: a staging buffer only)"
    )
    nvme_bytes: Bytes | None = Field(
        default=16 * 2**30, description="NVMe tier cap, LRU beyond it (None: the whole disk)"
    )
    fsync: bool = Field(default=True, description="fsync block files and their directory")
    snic_workers: int = Field(default=2, ge=1, description="concurrent NVMe I/Os per node")
    min_write_share: float = Field(
        default=0.05, ge=0, le=1, description="SNIC bytes persistence gets under read load"
    )
    read_timeout_s: float | None = Field(
        default=10.0,
        gt=0,
        description="a stored-KV load waits this long at most (a stalled or slow disk); the "
        "blocks not read by then are recomputed (None: wait)",
    )
    load_failure: KVFailurePolicy = Field(
        default=KVFailurePolicy.RECOMPUTE,
        description="a planned stored-KV read that fails or comes back short: recompute from "
        "the first bad block, or fail the request (503 kv_load_failed); never partial KV",
    )


class NodeSection(Section):
    """A logical node: its engines, one TrafficManager and one storage NIC.

    On one machine several logical nodes emulate a cluster (each SNIC with its own cap); on
    a Ray cluster pin each to a Ray node with `ray_resources` (e.g. {"node:10.0.0.5": 0.01}).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9_]+$")
    prefill: int = Field(default=0, ge=0, description="prefill engine replicas")
    decode: int = Field(default=0, ge=0, description="decode engine replicas")
    snic_bandwidth: Bytes | None = Field(
        default=None, description="storage NIC cap in bytes/s (None: the disk's own speed)"
    )
    ray_resources: dict[str, float] = Field(default_factory=dict)


class TracingSection(Section):
    """OpenTelemetry traces (deployments/tracing.py); every deployment gets the same one."""

    enabled: bool = True
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0, description="requests traced")
    exporter: Literal["auto", "otlp", "file", "console", "none"] = "auto"
    otlp_endpoint: str | None = Field(
        default=None, description="OTLP/HTTP traces URL, e.g. http://collector:4318/v1/traces"
    )
    path: Path = Field(
        default=Path("~/.cache/dualpath-serve/traces"), description="file exporter directory"
    )
    retention_days: int = Field(default=7, ge=1, description="days of span files kept")

    def endpoint(self) -> str | None:
        return self.otlp_endpoint or env.otlp_traces_endpoint()


class EngineReplicaOptions(Section):
    """Everything a prefill or decode replica needs to start."""

    model: ModelSection
    engine: EngineSection
    transfer: TransferSection
    node: str = "node0"
    report_interval_s: float = Field(default=0.25, gt=0)
    tracing: TracingSection = Field(default_factory=TracingSection)
