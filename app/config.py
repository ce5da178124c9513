"""AppConfig: the one validated config tree of the Serve application.

`serve_config.yaml`'s `args:` → `app.builder.build_app(args)` → `AppConfig.model_validate`.
Each section goes to exactly one kind of deployment; errors name their field path at start.
"""

from __future__ import annotations

from pydantic import Field

from deployments.options import (
    Bytes,
    EngineReplicaOptions,
    EngineSection,
    ModelSection,
    Section,
    TransferSection,
)


class IngressSection(Section):
    default_max_tokens: int = Field(default=512, ge=1, description="when a request sets none")
    max_body_bytes: Bytes = Field(default=4 * 2**20, description="larger bodies get 413")


class SchedulerSection(Section):
    report_interval_s: float = Field(default=0.25, gt=0, description="engine load reports")
    stale_after_s: float = Field(default=15.0, gt=0, description="forget silent engines")


class AppConfig(Section):
    name: str = Field(default="dualpath", description="Serve application name")
    model: ModelSection = Field(default_factory=ModelSection)
    engine: EngineSection = Field(default_factory=EngineSection)
    transfer: TransferSection = Field(default_factory=TransferSection)
    ingress: IngressSection = Field(default_factory=IngressSection)
    scheduler: SchedulerSection = Field(default_factory=SchedulerSection)

    def engine_replica(self) -> EngineReplicaOptions:
        return EngineReplicaOptions(
            model=self.model,
            engine=self.engine,
            transfer=self.transfer,
            report_interval_s=self.scheduler.report_interval_s,
        )
