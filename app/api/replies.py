"""OpenAI-compatible response objects (chat completions, completions, models, usage).

Usage carries OpenAI's fields plus DeepSeek-style `prompt_cache_hit_tokens` /
`prompt_cache_miss_tokens`; `timings` and `cost` are dualpath extensions.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.api.messages import ToolCall

ServiceTier = Literal["auto", "default", "priority", "flex"]
# engine FinishReason values, and "tool_calls" when the reply is tool calls
FinishReasonName = Literal["stop", "length", "abort", "error", "tool_calls"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Timings(BaseModel):
    """dualpath extension (like DeepSeek's cache fields): where the first token's time went."""

    queue_ms: float | None = Field(default=None, description="waiting for admission")
    prefill_ms: float | None = Field(
        default=None, description="engine time on the PE from admission to the first token"
    )
    schedule_ms: float | None = Field(default=None, description="the Scheduler's plan call")
    kv_read_ms: float | None = Field(
        default=None, description="reading the stored KV hit through the storage NICs"
    )


class Cost(BaseModel):
    """dualpath extension: what the request cost, and the billing window it ran in."""

    amount: float
    currency: str
    window: Literal["peak", "normal", "off_peak"]
    multiplier: float = Field(description="the window's price multiplier × the tier's")
    service_tier: Literal["priority", "default", "flex"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    prompt_cache_hit_tokens: int  # DeepSeek-style names for the same split
    prompt_cache_miss_tokens: int
    cost: Cost | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
            prompt_cache_hit_tokens=cached_tokens,
            prompt_cache_miss_tokens=prompt_tokens - cached_tokens,
        )


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobOut] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    """A streamed tool call: its first delta has `id`, `type` and `function.name`; argument
    fragments follow under the same `index` (their concatenation is the arguments)."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReasonName | None
    logprobs: ChoiceLogprobs | None = None


def _completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _completion_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    service_tier: ServiceTier | None = None
    system_fingerprint: str | None = None
    timings: Timings | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    finish_reason: FinishReasonName | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    service_tier: ServiceTier | None = None
    timings: Timings | None = None  # on the usage chunk


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReasonName | None = None  # None (left out) until the last chunk
    logprobs: CompletionLogprobs | None = None
    token_ids: list[int] | None = None  # with `return_token_ids`


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: _completion_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    service_tier: ServiceTier | None = None
    timings: Timings | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "dualpath-serve"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthStatus(BaseModel):
    """`/health`: 200 once a prefill and a decode engine report, 503 (`starting`) before."""

    status: Literal["ok", "starting"]
    engines: int = Field(ge=0, description="engines reporting to the Scheduler")


class UsagePage(BaseModel):
    """`/v1/usage`: time buckets of the caller's usage and cost (OpenAI usage-API shape)."""

    object: Literal["page"] = "page"
    data: list[dict[str, Any]]
    has_more: bool = False


def dump(model: BaseModel) -> dict[str, Any]:
    """Wire JSON: unset optional fields (None) are left out, as OpenAI does."""
    return model.model_dump(mode="json", exclude_none=True)
