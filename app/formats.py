"""One formatter per API shape: how a request's outputs become OpenAI objects.

ChatService runs one path for both shapes (prompt → admitted choices → deltas); the shape
decides only the objects: `chat.completion` (+ `chat.completion.chunk`s, a role chunk per
choice first) or `text_completion` (chunks of the same type, optionally with token ids).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.api.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChunkChoice,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    Timings,
    Usage,
)
from app.logprobs import LogprobFormatter
from app.request_meter import Choice
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


class ChatFormat:
    id_prefix = "chatcmpl"

    def __init__(self, logprobs: LogprobFormatter):
        self.logprobs = logprobs

    def every_token(self, request: ChatCompletionRequest) -> bool:
        """Whether each output with tokens is a chunk, text or not (only with token ids)."""
        return False

    def response(
        self,
        head: Head,
        request: ChatCompletionRequest,
        choices: list[Choice],
        usage: Usage,
        timings: Timings,
    ) -> ChatCompletionResponse:
        return ChatCompletionResponse(
            **head.fields(),
            timings=timings,
            choices=[
                ChatChoice(
                    index=i,
                    message=AssistantMessage(content=c.text),
                    finish_reason=c.finish_reason,
                    logprobs=self.logprobs.chat(c.logprobs),
                )
                for i, c in enumerate(choices)
            ],
            usage=usage,
        )

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
        self, head: Head, request: ChatCompletionRequest, index: int, out: RequestOutput
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            **head.fields(),
            choices=[
                ChunkChoice(
                    index=index,
                    delta=DeltaMessage(content=out.new_text or None),
                    finish_reason=out.finish_reason if out.finished else None,
                    logprobs=self.logprobs.chat(out.new_logprobs) if request.logprobs else None,
                )
            ],
        )

    def usage(self, head: Head, usage: Usage, timings: Timings) -> ChatCompletionChunk:
        return ChatCompletionChunk(**head.fields(), choices=[], usage=usage, timings=timings)


class CompletionFormat:
    id_prefix = "cmpl"

    def __init__(self, logprobs: LogprobFormatter):
        self.logprobs = logprobs

    def every_token(self, request: CompletionRequest) -> bool:
        return request.return_token_ids

    def response(
        self,
        head: Head,
        request: CompletionRequest,
        choices: list[Choice],
        usage: Usage,
        timings: Timings,
    ) -> CompletionResponse:
        return CompletionResponse(
            **head.fields(),
            timings=timings,
            choices=[
                CompletionChoice(
                    index=i,
                    text=c.text,
                    finish_reason=c.finish_reason,
                    logprobs=self.logprobs.completion(c.logprobs),
                    token_ids=c.token_ids if request.return_token_ids else None,
                )
                for i, c in enumerate(choices)
            ],
            usage=usage,
        )

    def opening(self, head: Head, request: CompletionRequest) -> list[CompletionResponse]:
        return []

    def delta(
        self, head: Head, request: CompletionRequest, index: int, out: RequestOutput
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

    def usage(self, head: Head, usage: Usage, timings: Timings) -> CompletionResponse:
        return CompletionResponse(**head.fields(), choices=[], usage=usage, timings=timings)
