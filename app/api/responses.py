"""The Responses API (`/v1/responses`): request, response object, streamed events.

What agent clients default to (the OpenAI Agents SDK; Codex speaks only this API). The
request maps onto the chat path (`app.responses.to_chat`): `input` items become messages,
flat function tools become chat tools, `text.format` becomes `response_format`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.api.messages import FUNCTION_NAME
from app.api.replies import Cost, ServiceTier, Timings
from app.api.schemas import (
    UNSUPPORTED_FIELDS,
    ChatCompletionRequest,
    CompletionRequest,
    _by_type,
    _whole_number_as_int,
)

# Responses fields that change the output and are not implemented here (400 when set).
_RESPONSES_UNSUPPORTED = ("background", "conversation", "max_tool_calls", "prompt", "top_logprobs")
# `include` values that ask for nothing this server could leave out (it has no reasoning)
_INCLUDABLE = {"reasoning.encrypted_content"}


# ---------------------------------------------------------------------------- input
class ContentPart(BaseModel):
    """Text of a message item (`input_text` from the user, `output_text` replayed)."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["input_text", "output_text", "text"]
    text: str


class MessageItem(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class FunctionCallItem(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str


class FunctionCallOutputItem(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: str


InputItem = FunctionCallItem | FunctionCallOutputItem | MessageItem


class FunctionTool(BaseModel):
    """A Responses function tool (flat: no `function` wrapper)."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["function"]
    name: str = Field(min_length=1)


class TextFormat(BaseModel):
    """`text.format`: text, any JSON object, or JSON matching `schema`."""

    model_config = ConfigDict(
        extra="allow",
        strict=True,
        populate_by_name=True,
        json_schema_extra={
            "if": {"properties": {"type": {"const": "json_schema"}}, "required": ["type"]},
            "then": {"required": ["schema"], "properties": {"schema": {"type": "object"}}},
        },
    )

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, pattern=FUNCTION_NAME)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("text.format of type json_schema needs schema")
        return self


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    format: TextFormat | None = None


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1)
    input: str | list[InputItem] = Field(
        description="text, or items: messages, function_call, function_call_output",
        json_schema_extra=_by_type(string={"minLength": 1}, array={"minItems": 1}),
    )
    instructions: str | None = None
    tools: list[FunctionTool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, description="extension")
    speculative: bool = Field(
        default=True, description="extension: false opts out of speculative decoding"
    )
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    service_tier: ServiceTier | None = None
    metadata: dict[str, str] | None = None
    user: str | None = Field(default=None, max_length=256)

    @field_validator("*", mode="before")
    @classmethod
    def _whole_numbers(cls, value: Any) -> Any:
        """JSON Schema's integer includes 2.0 (as on the chat request)."""
        return _whole_number_as_int(value)

    @field_validator("input")
    @classmethod
    def _non_empty(cls, v: str | list[InputItem]) -> str | list[InputItem]:
        if len(v) == 0:
            raise ValueError("input must not be empty")
        return v

    def unsupported_fields(self) -> list[str]:
        """Fields that would change the output and are not implemented (a 400 each)."""
        extra = self.model_extra or {}
        semantic = (*UNSUPPORTED_FIELDS, *_RESPONSES_UNSUPPORTED)
        out = [f for f in semantic if extra.get(f) not in (None, {}, [], False)]
        reasoning = extra.get("reasoning")  # a model without reasoning: only "no reasoning"
        settings = reasoning.values() if isinstance(reasoning, dict) else [reasoning]
        if any(v not in (None, "none") for v in settings):
            out.append("reasoning")
        if extra.get("truncation") not in (None, "disabled"):
            out.append("truncation")
        include = extra.get("include") or []
        if not isinstance(include, list) or set(include) - _INCLUDABLE:
            out.append("include")
        return out

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


# ---------------------------------------------------------------------------- output
class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str = Field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str = Field(default_factory=lambda: f"fc_{uuid.uuid4().hex}")
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] = "completed"


OutputItem = OutputMessage | OutputFunctionCall


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int
    cost: Cost | None = None  # dualpath extension, as on chat usage


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class Response(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    usage: ResponseUsage | None = None
    incomplete_details: IncompleteDetails | None = None
    error: dict[str, Any] | None = None
    instructions: str | None = None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: Any = "auto"
    parallel_tool_calls: bool = True
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    previous_response_id: str | None = None
    store: bool = True
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    truncation: Literal["disabled"] = "disabled"
    service_tier: ServiceTier | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    timings: Timings | None = None  # dualpath extension


class ResponseEvent(BaseModel):
    """One streamed event: `type` (`response.created`, `response.output_item.added`,
    `response.output_text.delta`, `response.function_call_arguments.delta`,
    `response.completed`, …), its `sequence_number`, and the fields of that type."""

    model_config = ConfigDict(extra="allow")

    type: str
    sequence_number: int


# every body the generation routes (and the handle's chat/chat_stream) take
GenerateRequest = ChatCompletionRequest | CompletionRequest | ResponsesRequest
