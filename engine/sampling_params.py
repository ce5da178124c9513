"""Per-request sampling parameters, validated on construction (bad values raise ValueError)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

_GREEDY_TEMPERATURE = 1e-5


class SamplingParams(BaseModel):
    """How to pick each next token, and when to stop.

    `temperature == 0` means greedy. `seed` makes sampling reproducible for this request
    regardless of what else is in the batch.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, description="0 = off")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    max_tokens: int = Field(default=256, ge=1)
    min_tokens: int = Field(default=0, ge=0)
    stop: list[str] = Field(default_factory=list, max_length=16)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list)
    ignore_eos: bool = False
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logprobs: int | None = Field(default=None, ge=0, le=20, description="top-n logprobs")
    include_stop_str_in_output: bool = False
    speculative: bool = Field(
        default=True,
        description="let the engine draft and verify tokens for this request when it "
        "speculates (the output is the same either way; False opts out)",
    )
    grammar: str | None = Field(
        default=None,
        description="an llguidance grammar (Lark, JSON schemas inline with %json) the output "
        "must match; the engine masks every other token (engine/structured.py)",
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, v: object) -> object:
        if v is None:
            return []
        return [v] if isinstance(v, str) else v

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, v: list[str]) -> list[str]:
        if any(s == "" for s in v):
            raise ValueError("stop strings must be non-empty")
        return v

    @property
    def is_greedy(self) -> bool:
        # NOTE: temperatures this small are argmax in effect and would overflow as divisors.
        return self.temperature < _GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
