"""AppConfig: the one validated config tree of the Serve application.

`serve_config.yaml`'s `args:` → `app.builder.build_app(args)` → `AppConfig.model_validate`.
Each section goes to exactly one kind of deployment; errors name their field path at start.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from app.admission.queues import QueueSection
from app.audit import AuditSection
from app.auth import AuthSection
from app.pricing import PricingSection
from deployments.options import (
    Bytes,
    EngineReplicaOptions,
    EngineSection,
    KVStoreSection,
    ModelSection,
    NodeSection,
    Section,
    TracingSection,
    TransferSection,
)
from deployments.scheduler.policy import PolicyConfig, PolicyName


class IngressSection(Section):
    default_max_tokens: int = Field(default=512, ge=1, description="when a request sets none")
    max_body_bytes: Bytes = Field(default=4 * 2**20, description="larger bodies get 413")
    max_tokens_limit: int | None = Field(
        default=None, ge=1, description="a request's max_tokens above this gets 400"
    )
    ledger_path: Path | None = Field(
        default_factory=lambda: Path("~/.cache/dualpath-serve/usage.jsonl"),
        description="per-tenant usage ledger (JSON lines); null keeps it in memory",
    )
    capacity_poll_s: float = Field(default=0.25, gt=0, description="engine load for admission")
    max_replica_retries: int = Field(
        default=4, ge=0, description="replicas lost mid-request that one choice survives"
    )
    response_store_tokens: int = Field(
        default=16_000_000,
        ge=0,
        description="Responses API: tokens of stored conversations an Ingress replica keeps "
        "(least recently used dropped first; about 8 bytes each)",
    )


class SchedulerSection(Section):
    report_interval_s: float = Field(default=0.25, gt=0, description="engine load reports")
    stale_after_s: float = Field(default=15.0, gt=0, description="forget silent engines")
    policy: PolicyName = Field(
        default="dualpath", description="dualpath | dualpath_split | single_path | round_robin"
    )
    alpha_s: float = Field(default=3.0, gt=0, description="short read queue: drains within")
    beta_s: float = Field(default=5.0, gt=0, description="PE overloaded beyond this much work")
    z_factor: float = Field(default=1.05, ge=1.0, description="DE high-token threshold")
    prefill_tokens_per_s: float = Field(
        default=1000.0, gt=0, description="a PE's rate until it has measured its own"
    )
    forward_bytes_per_s: float = Field(
        default=25e9, gt=0, description="DE -> PE forwarding rate of KV the decode side read"
    )
    tie_fraction: float = Field(
        default=0.1, ge=0, lt=1, description="read sides this close in finish time alternate"
    )
    dram_pulls: bool = Field(
        default=True,
        description="a block in another node's DRAM is pulled from there (object store) when "
        "that beats the reading node's SNIC queue",
    )
    planned_ttl_s: float = Field(
        default=60.0, gt=0, description="planned work no report confirms is dropped after"
    )

    def policy_config(self) -> PolicyConfig:
        return PolicyConfig(
            name=self.policy,
            alpha_s=self.alpha_s,
            beta_s=self.beta_s,
            z_factor=self.z_factor,
            prefill_tokens_per_s=self.prefill_tokens_per_s,
            forward_bytes_per_s=self.forward_bytes_per_s,
            tie_fraction=self.tie_fraction,
            dram_pulls=self.dram_pulls,
        )


def _default_nodes() -> list[NodeSection]:
    return [NodeSection(name="node0", prefill=1, decode=1)]


class AppConfig(Section):
    name: str = Field(default="dualpath", description="Serve application name")
    model: ModelSection = Field(default_factory=ModelSection)
    engine: EngineSection = Field(default_factory=EngineSection)
    transfer: TransferSection = Field(default_factory=TransferSection)
    ingress: IngressSection = Field(default_factory=IngressSection)
    auth: AuthSection = Field(default_factory=AuthSection)
    admission: QueueSection = Field(default_factory=QueueSection)
    pricing: PricingSection = Field(default_factory=PricingSection)
    audit: AuditSection = Field(default_factory=AuditSection)
    tracing: TracingSection = Field(default_factory=TracingSection)
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)
    kvstore: KVStoreSection = Field(default_factory=KVStoreSection)
    nodes: list[NodeSection] = Field(default_factory=_default_nodes, min_length=1)
    control_ray_resources: dict[str, float] = Field(
        default_factory=dict,
        description="pin the Ingress and the Scheduler to a Ray node (e.g. {head: 0.01}) so "
        "losing a worker host never takes them along",
    )

    @model_validator(mode="after")
    def _check_nodes(self) -> AppConfig:
        names = [n.name for n in self.nodes]
        if len(set(names)) != len(names):
            raise ValueError(f"node names must be unique, got {names}")
        if not any(n.prefill for n in self.nodes) or not any(n.decode for n in self.nodes):
            raise ValueError("the nodes need at least one prefill and one decode engine")
        return self

    def engine_replica(self, node: str) -> EngineReplicaOptions:
        return EngineReplicaOptions(
            model=self.model,
            engine=self.engine,
            transfer=self.transfer,
            node=node,
            report_interval_s=self.scheduler.report_interval_s,
            tracing=self.tracing,
        )
