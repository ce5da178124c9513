"""One formatter per API shape: how a request's outputs become OpenAI objects.

ChatService runs one path for both shapes (prompt → admitted choices → deltas); the shape
decides only the objects: `chat.completion` (+ `chat.completion.chunk`s, a role chunk per
choice first) or `text_completion` (chunks of the same type, optionally with token ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.api.messages import FunctionCall, ToolCall
from app.api.replies import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChunkChoice,
    CompletionChoice,
    CompletionResponse,
    DeltaMessage,
    FunctionCallDelta,
    Timings,
    ToolCallDelta,
    Usage,
)
from app.api.schemas import ChatCompletionRequest, CompletionRequest
from app.logprobs import LogprobFormatter
from app.request_meter import Choice
from app.tool_parser import Arguments, CallStart, Content, ToolCallParser, parse
from app.tools import calls_possible
from engine.output import RequestOutput


@dataclass(frozen=True, slots=True)
class Head:
    """The fields every object of one response shares."""

    id: str
    created: int
    model: str
    service_tier: str | None

    def fields(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created": self.created,
            "model": self.model,
            "service_tier": self.service_tier,
        }


class _Format:
    """What both shapes share: the response's frame and the usage chunk."""

    id_prefix: str  # the response id is this + the request id
    continues: list[int] | None = None  # token ids the prompt must start with (Responses)
    response_type: type[ChatCompletionResponse] | type[CompletionResponse]
    chunk_type: type[ChatCompletionChunk] | type[CompletionResponse]

    def __init__(self, logprobs: LogprobFormatter):
        self.logprobs = logprobs

    def response(
        self, head: Head, request: Any, choices: list[Choice], usage: Usage, timings: Timings
    ) -> Any:
        """The whole reply: every choice's accumulated text, usage and timings."""
        items = [self.choice(i, c, request) for i, c in enumerate(choices)]
        return self.response_type(**head.fields(), timings=timings, choices=items, usage=usage)

    def choice(self, index: int, choice: Choice, request: Any) -> Any:
        raise NotImplementedError

    def stream_state(self, request: Any) -> Any:
        """Per-stream state the deltas share (the chat shape's tool-call parsers)."""
        return None

    def note_prompt(self, prompt: list[int]) -> None:
        """The prompt as run (the Responses shape stores it; the others need nothing)."""

    def usage(self, head: Head, usage: Usage, timings: Timings, state: Any = None) -> Any:
        """The stream's last chunk (with stream_options.include_usage): no choices."""
        return self.chunk_type(**head.fields(), choices=[], usage=usage, timings=timings)


class ChatFormat(_Format):
    id_prefix = "chatcmpl-"
    response_type = ChatCompletionResponse
    chunk_type = ChatCompletionChunk

    def every_token(self, request: ChatCompletionRequest) -> bool:
        """Whether each output with tokens is a chunk, text or not (only with token ids)."""
        return False

    def choice(self, index: int, choice: Choice, request: ChatCompletionRequest) -> ChatChoice:
        message, finish = AssistantMessage(content=choice.text), choice.finish_reason
        if calls_possible(request.tools, request.tool_choice):
            content, calls = parse(choice.text)
            message = AssistantMessage(
                content=content or None,
                tool_calls=[
                    ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments))
                    for c in calls
                ]
                or None,
            )
            finish = "tool_calls" if calls and finish == "stop" else finish
        return ChatChoice(
            index=index,
            message=message,
            finish_reason=finish,
            logprobs=self.logprobs.chat(choice.logprobs),
        )

    def stream_state(self, request: ChatCompletionRequest) -> dict[int, ToolCallParser] | None:
        if not calls_possible(request.tools, request.tool_choice):
            return None
        return {i: ToolCallParser() for i in range(request.n)}

    def opening(self, head: Head, request: ChatCompletionRequest) -> list[ChatCompletionChunk]:
        """A role chunk per choice, before any content (as OpenAI streams)."""
        return [
            ChatCompletionChunk(
                **head.fields(),
                choices=[ChunkChoice(index=i, delta=DeltaMessage(role="assistant"))],
            )
            for i in range(request.n)
        ]

    def delta(
        self,
        head: Head,
        request: ChatCompletionRequest,
        index: int,
        out: RequestOutput,
        parsers: dict[int, ToolCallParser] | None = None,
    ) -> ChatCompletionChunk | None:
        """The chunk for one output (None when tool-call parsing holds all of it back)."""
        delta = DeltaMessage(content=out.new_text or None)
        finish = out.finish_reason if out.finished else None
        if parsers is not None:
            parser = parsers[index]
            events = parser.feed(out.new_text) + (parser.finish() if out.finished else [])
            delta = _tool_delta(events)
            if finish == "stop" and parser.calls:
                finish = "tool_calls"
        logprobs = self.logprobs.chat(out.new_logprobs) if request.logprobs else None
        if delta.content is None and delta.tool_calls is None and finish is None and not logprobs:
            return None
        return ChatCompletionChunk(
            **head.fields(),
            choices=[
                ChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=logprobs)
            ],
        )


def _tool_delta(events: list[Content | CallStart | Arguments]) -> DeltaMessage:
    content = "".join(e.text for e in events if isinstance(e, Content))
    calls = []
    for e in events:
        if isinstance(e, CallStart):
            fn = FunctionCallDelta(name=e.name, arguments="")
            calls.append(ToolCallDelta(index=e.index, id=e.id, type="function", function=fn))
        elif isinstance(e, Arguments):
            calls.append(ToolCallDelta(index=e.index, function=FunctionCallDelta(arguments=e.text)))
    return DeltaMessage(content=content or None, tool_calls=calls or None)


class CompletionFormat(_Format):
    id_prefix = "cmpl-"
    response_type = CompletionResponse
    chunk_type = CompletionResponse

    def every_token(self, request: CompletionRequest) -> bool:
        return request.return_token_ids

    def choice(self, index: int, choice: Choice, request: CompletionRequest) -> CompletionChoice:
        return CompletionChoice(
            index=index,
            text=choice.text,
            finish_reason=choice.finish_reason,
            logprobs=self.logprobs.completion(choice.logprobs),
            token_ids=choice.token_ids if request.return_token_ids else None,
        )

    def opening(self, head: Head, request: CompletionRequest) -> list[CompletionResponse]:
        return []

    def delta(
        self,
        head: Head,
        request: CompletionRequest,
        index: int,
        out: RequestOutput,
        state: None = None,
    ) -> CompletionResponse:
        logprobs = request.logprobs is not None
        return CompletionResponse(
            **head.fields(),
            choices=[
                CompletionChoice(
                    index=index,
                    text=out.new_text,
                    finish_reason=out.finish_reason if out.finished else None,
                    logprobs=self.logprobs.completion(out.new_logprobs) if logprobs else None,
                    token_ids=out.new_token_ids if request.return_token_ids else None,
                )
            ],
        )
