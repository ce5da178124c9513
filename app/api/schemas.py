"""OpenAI-compatible request models (chat completions, completions); replies in replies.py.

Requests validate types and ranges here (a bad value is a 400 naming the field) and map onto
the engine's SamplingParams; rules across tools, messages and formats are `app.tools`'.

NOTE: the request models' JSON schemas are the published contract (/openapi.json): a rule a
validator enforces is stated in the schema too (`_by_type`, `_when_set`), so every body the
document accepts validates here. tests/app/test_http.py generates bodies from it to check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.api.messages import ChatMessage, ResponseFormat, Tool, ToolChoice
from app.api.replies import ServiceTier
from engine.sampling_params import SamplingParams

MAX_N = 8
# Fields OpenAI defines that change the output and that this server does not implement: a
# request naming one is refused (400) rather than answered as if it had not.
UNSUPPORTED_FIELDS = (
    "logit_bias", "functions", "function_call", "prediction", "audio", "modalities",
    "reasoning_effort", "web_search_options", "verbosity", "best_of",
)  # fmt: skip


def _whole_number_as_int(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _by_type(**keywords: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    """`json_schema_extra` that adds JSON Schema `keywords` to the branch of each JSON type
    (`string=...`, `array=...`) of a union field: the schema of a validator's rule."""

    def extra(schema: dict[str, Any]) -> None:
        for branch in schema.get("anyOf", [schema]):
            branch.update(keywords.get(branch.get("type", ""), {}))

    return extra


def _when_set(field: str, **then: Any) -> dict[str, Any]:
    """JSON Schema for a cross-field rule: when `field` is set (not null), each of `then`'s
    fields must be present with the given value."""
    return {
        "if": {"properties": {field: {"not": {"type": "null"}}}, "required": [field]},
        "then": {"properties": {k: {"const": v} for k, v in then.items()}, "required": list(then)},
    }


_STREAM_OPTIONS_NEED_STREAM = _when_set("stream_options", stream=True)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class _Request(BaseModel):
    # NOTE: clients send fields we do not use (e.g. `store`, `metadata`); they are accepted
    # and listed by `ignored_fields()` so the ingress can log them, as vLLM does. Values are
    # strict JSON types, as the schema says and OpenAI checks: `"n": "2"` or `"stream": 1`
    # is a 400, not coerced.
    model_config = ConfigDict(
        extra="allow", strict=True, json_schema_extra={"allOf": [_STREAM_OPTIONS_NEED_STREAM]}
    )

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, description="extension (vLLM-style)")
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = Field(
        default=None,
        json_schema_extra=_by_type(
            string={"minLength": 1},
            array={"maxItems": 4, "items": {"type": "string", "minLength": 1}},
        ),
    )
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    min_tokens: int | None = Field(default=None, ge=0, description="extension (vLLM-style)")
    ignore_eos: bool = False
    user: str | None = Field(default=None, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    service_tier: ServiceTier | None = None
    response_format: ResponseFormat | None = Field(
        default=None, description="json_object / json_schema: grammar-constrained output"
    )
    speculative: bool = Field(
        default=True,
        description="extension: false opts this request out of speculative decoding on "
        "engines that speculate (the output is the same either way)",
    )

    @field_validator("*", mode="before")
    @classmethod
    def _whole_numbers(cls, value: Any) -> Any:
        """JSON Schema's integer includes 2.0, so the strict int fields take it as 2 (and a
        float field takes 2 as 2.0)."""
        if isinstance(value, list):
            return [_whole_number_as_int(v) for v in value]
        return _whole_number_as_int(value)

    @field_validator("stop")
    @classmethod
    def _stop_limits(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return v

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> _Request:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def unsupported_fields(self) -> list[str]:
        """Fields the client set that would change the output but are not implemented."""
        return [f for f in UNSUPPORTED_FIELDS if (self.model_extra or {}).get(f) is not None]

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})

    def _sampling(self, max_tokens: int, logprobs: int | None, index: int) -> SamplingParams:
        """Engine params for choice `index` of n (seeded choices get seed + index)."""
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=None if self.seed is None else (self.seed + index) % 2**63,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens or 0,
            stop=self.stop,
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logprobs=logprobs,
            speculative=self.speculative,
        )


class ChatCompletionRequest(_Request):
    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [_STREAM_OPTIONS_NEED_STREAM, _when_set("top_logprobs", logprobs=True)]
        }
    )

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: ToolChoice | None = Field(
        default=None, description="default: auto with tools, none without"
    )
    parallel_tool_calls: bool = True
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def sampling_params(self, default_max_tokens: int, index: int = 0) -> SamplingParams:
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        top = (self.top_logprobs or 0) if self.logprobs else None
        return self._sampling(max_tokens, top, index)


class CompletionRequest(_Request):
    prompt: str | list[int] = Field(
        description="text, or token ids",
        json_schema_extra=_by_type(
            string={"minLength": 1},
            array={"minItems": 1, "items": {"type": "integer", "minimum": 0}},
        ),
    )
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = Field(
        default=False, description="not supported", json_schema_extra={"const": False}
    )
    suffix: str | None = Field(
        default=None,
        description="not supported (empty or null)",
        json_schema_extra=_by_type(string={"maxLength": 0}),
    )
    return_token_ids: bool = Field(
        default=False,
        description="extension (vLLM-style): each choice carries its generated `token_ids`, "
        "so an agent can extend the exact context (and hit the KV cache) next turn",
    )

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: str | list[int]) -> str | list[int]:
        if len(v) == 0:
            raise ValueError("prompt must not be empty")
        return v

    @model_validator(mode="after")
    def _unsupported(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self

    def sampling_params(self, default_max_tokens: int, index: int = 0) -> SamplingParams:
        return self._sampling(self.max_tokens or default_max_tokens, self.logprobs, index)
