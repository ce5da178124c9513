"""QueueSection: the admission queue's configuration (`admission:` in the app config)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationInfo, field_validator

from app.auth import Tier
from deployments.options import Section


class QueueSection(Section):
    max_queued: dict[Tier, int] = Field(
        default_factory=lambda: dict(DEFAULT_MAX_QUEUED), description="per tier; beyond it 503"
    )
    queue_timeout_s: float = Field(default=120.0, gt=0, description="priority/default → 408")
    flex_deadline_s: float = Field(default=900.0, gt=0, description="flex → 429")
    tier_offset_s: dict[Tier, float] = Field(
        default_factory=lambda: dict(DEFAULT_TIER_OFFSET_S),
        description="a request's turn: arrival + its tier's offset; the earliest goes first",
    )
    tier_share: dict[Tier, float] = Field(
        default_factory=lambda: dict(DEFAULT_TIER_SHARE),
        description="the share of capacity each tier may fill",
    )
    flex_idle_share: float = Field(default=0.3, ge=0, le=1, description="flex runs in peak below")
    quantum_tokens: int = Field(default=2048, ge=1, description="DRR credit per turn")
    prefill_queue_s: float = Field(
        default=2.0, gt=0, description="admit while queued prefill work stays under this"
    )
    read_queue_s: float = Field(
        default=6.0,
        gt=0,
        description="admit while queued stored-KV reads stay under this many seconds of the "
        "SNICs' read rate (keep it below kvstore.read_timeout_s)",
    )
    default_prefill_tokens_per_s: float = Field(
        default=1000.0, gt=0, description="a PE's rate until it has measured its own"
    )

    @field_validator("max_queued", "tier_share", "tier_offset_s", mode="after")
    @classmethod
    def _every_tier(cls, v: dict[Tier, Any], info: ValidationInfo) -> dict[Tier, Any]:
        """A partial map keeps the defaults of the tiers it leaves out."""
        defaults = {
            "max_queued": DEFAULT_MAX_QUEUED,
            "tier_share": DEFAULT_TIER_SHARE,
            "tier_offset_s": DEFAULT_TIER_OFFSET_S,
        }[info.field_name or ""]
        for value in v.values():
            if value < 0 or (info.field_name == "tier_share" and value > 1):
                raise ValueError(f"{info.field_name} values must be in range, got {value}")
        return {**defaults, **v}


DEFAULT_MAX_QUEUED: dict[Tier, int] = {"priority": 256, "default": 1024, "flex": 4096}
DEFAULT_TIER_SHARE: dict[Tier, float] = {"priority": 1.0, "default": 0.85, "flex": 0.6}
DEFAULT_TIER_OFFSET_S: dict[Tier, float] = {"priority": 0.0, "default": 120.0, "flex": 600.0}
