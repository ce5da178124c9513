"""Chat messages, function tools, tool choice and response formats (OpenAI shapes).

Shared by chat completions and the Responses API (which maps its items onto these). Tool
and schema rules that the JSON Schema can state are in the schema too (see schemas.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FUNCTION_NAME = r"^[a-zA-Z0-9_.-]{1,64}$"


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = ConfigDict(strict=True)

    name: str = Field(pattern=FUNCTION_NAME)
    arguments: str = Field(description="the arguments as a JSON object, serialised")


class ToolCall(BaseModel):
    model_config = ConfigDict(strict=True)

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, description="assistant messages")
    tool_call_id: str | None = Field(default=None, description="tool messages: the call answered")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class FunctionDef(BaseModel):
    model_config = ConfigDict(strict=True)

    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None, description="JSON Schema of the arguments object (omitted: no arguments)"
    )
    strict: bool | None = Field(
        default=None, description="accepted; every tool's arguments are grammar-constrained"
    )


class Tool(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(strict=True)

    name: str = Field(min_length=1)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(strict=True, populate_by_name=True)

    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`text` (the default), any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(
        strict=True,
        json_schema_extra={  # the validator's rule, stated in the published schema
            "if": {"properties": {"type": {"const": "json_schema"}}, "required": ["type"]},
            "then": {
                "required": ["json_schema"],
                "properties": {"json_schema": {"type": "object"}},
            },
        },
    )

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = Field(
        default=None, description="required when type is json_schema"
    )

    @model_validator(mode="after")
    def _json_schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs json_schema")
        return self

    def schema_of_output(self) -> dict[str, Any] | None:
        """The JSON Schema every output must match (None: free text)."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema" and self.json_schema is not None:
            return self.json_schema.schema_ or {}
        return None
