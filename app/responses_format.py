"""The Responses API's shape: a run's outputs as a `response` object, or as its typed event
stream (`response.created` … `response.output_text.delta`,
`response.function_call_arguments.delta` … `response.completed`).

One ResponsesFormat per request: it holds the request, the conversation so far and the
store it writes the finished response to (with the exact prompt + output token ids).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from app.api.messages import ChatMessage, FunctionCall, ToolCall
from app.api.replies import Timings, Usage
from app.api.responses import (
    IncompleteDetails,
    InputTokensDetails,
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputText,
    Response,
    ResponseEvent,
    ResponsesRequest,
    ResponseUsage,
)
from app.formats import Head
from app.request_meter import Choice
from app.response_store import ResponseStore
from app.tool_parser import Arguments, CallStart, Content, ToolCallParser, parse
from app.tools import calls_possible
from engine.output import RequestOutput


@dataclass(slots=True)
class _Open:
    """The output item being streamed."""

    index: int
    item: OutputItem
    text: str = ""


@dataclass(slots=True)
class _StreamState:
    parser: ToolCallParser | None
    sequence: int = 0
    items: list[OutputItem] = field(default_factory=list)
    open: _Open | None = None
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class ResponsesFormat:
    """One Responses request's shape (per request: it holds the request and the store)."""

    id_prefix = "resp_"

    def __init__(
        self,
        request: ResponsesRequest,
        store: ResponseStore,
        tenant: str,
        conversation: list[ChatMessage],
        continues: list[int] | None,
    ):
        self.request = request
        self.store = store
        self.tenant = tenant
        self.conversation = conversation
        self.continues = continues  # the stored tokens the prompt should start with
        self.prompt_ids: list[int] = []
        self.calls_possible = calls_possible(request.tools, request.tool_choice)

    def note_prompt(self, prompt: list[int]) -> None:
        self.prompt_ids = prompt

    def every_token(self, request: Any) -> bool:
        return True  # every token id reaches the stream: the store keeps them all

    # ------------------------------------------------------------------ whole response
    def response(
        self, head: Head, chat: Any, choices: list[Choice], usage: Usage, timings: Timings
    ) -> Response:
        (choice,) = choices
        if self.calls_possible:
            content, calls = parse(choice.text)
        else:
            content, calls = choice.text, []
        items: list[OutputItem] = []
        if content or not calls:
            items.append(OutputMessage(content=[OutputText(text=content)]))
        items += [
            OutputFunctionCall(call_id=c.id, name=c.name, arguments=c.arguments) for c in calls
        ]
        return self._finish(head, items, choice.finish_reason, choice.token_ids, usage, timings)

    def _finish(
        self,
        head: Head,
        items: list[OutputItem],
        finish_reason: str | None,
        token_ids: list[int],
        usage: Usage | None,
        timings: Timings | None,
    ) -> Response:
        incomplete = finish_reason == "length"
        for item in items:
            item.status = "incomplete" if incomplete else "completed"
        response = self._frame(head, "incomplete" if incomplete else "completed", items)
        response.incomplete_details = (
            IncompleteDetails(reason="max_output_tokens") if incomplete else None
        )
        if usage is not None:
            response.usage = ResponseUsage(
                input_tokens=usage.prompt_tokens,
                input_tokens_details=InputTokensDetails(
                    cached_tokens=usage.prompt_tokens_details.cached_tokens
                ),
                output_tokens=usage.completion_tokens,
                total_tokens=usage.total_tokens,
                cost=usage.cost,
            )
        response.timings = timings
        if self.request.store:
            self.store.put(
                response.id,
                self.tenant,
                [*self.conversation, _as_message(items)],
                [*self.prompt_ids, *token_ids],
                response,
            )
        return response

    def _frame(self, head: Head, status: str, items: list[OutputItem]) -> Response:
        r = self.request
        fmt = r.text.format if r.text else None
        return Response(
            id=head.id,
            created_at=head.created,
            status=status,  # type: ignore[arg-type]
            model=head.model,
            output=items,
            instructions=r.instructions,
            tools=[t.model_dump(exclude_none=True) for t in r.tools or ()],
            tool_choice=r.tool_choice.model_dump()
            if r.tool_choice is not None and not isinstance(r.tool_choice, str)
            else (r.tool_choice or "auto"),
            parallel_tool_calls=r.parallel_tool_calls,
            temperature=r.temperature,
            top_p=r.top_p,
            max_output_tokens=r.max_output_tokens,
            previous_response_id=r.previous_response_id,
            store=r.store,
            text={"format": fmt.model_dump(by_alias=True, exclude_none=True)}
            if fmt
            else {"format": {"type": "text"}},
            service_tier=head.service_tier,  # type: ignore[arg-type]
            metadata=r.metadata or {},
        )

    # ------------------------------------------------------------------ events
    def stream_state(self, request: Any) -> _StreamState:
        return _StreamState(ToolCallParser() if self.calls_possible else None)

    def opening(self, head: Head, request: Any) -> list[ResponseEvent]:
        frame = self._frame(head, "in_progress", []).model_dump(mode="json")
        return [
            ResponseEvent(type="response.created", sequence_number=0, response=frame),
            ResponseEvent(type="response.in_progress", sequence_number=1, response=frame),
        ]

    def delta(
        self, head: Head, request: Any, index: int, out: RequestOutput, state: _StreamState
    ) -> list[ResponseEvent] | None:
        state.token_ids += out.new_token_ids
        if state.parser is None:
            pieces: list[Content | CallStart | Arguments] = [Content(out.new_text)]
        else:
            pieces = state.parser.feed(out.new_text)
            if out.finished:
                pieces += state.parser.finish()
        events: list[dict[str, Any]] = []
        for piece in pieces:
            events += self._events(piece, state)
        if out.finished:
            state.finish_reason = out.finish_reason
            if not state.items and state.open is None:  # an empty reply is still a message
                events += self._events(Content(""), state, force=True)
            events += self._close(state)
        return [self._event(state, e) for e in events] or None

    def usage(
        self, head: Head, usage: Usage, timings: Timings, state: _StreamState
    ) -> list[ResponseEvent]:
        """The stream's end: `response.completed` (or `.incomplete`) with the whole object."""
        response = self._finish(
            head, state.items, state.finish_reason, state.token_ids, usage, timings
        )
        kind = "response.incomplete" if response.status == "incomplete" else "response.completed"
        return [self._event(state, {"type": kind, "response": response.model_dump(mode="json")})]

    def _event(self, state: _StreamState, fields: dict[str, Any]) -> ResponseEvent:
        state.sequence += 1
        return ResponseEvent(sequence_number=state.sequence + 1, **fields)

    def _events(
        self, piece: Content | CallStart | Arguments, state: _StreamState, force: bool = False
    ) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if isinstance(piece, Content):
            if not piece.text and not force:
                return events
            if state.open is None or not isinstance(state.open.item, OutputMessage):
                events += self._close(state)
                item = OutputMessage(status="in_progress", content=[])
                state.open = _Open(len(state.items), item)
                events += [
                    self._added(state.open),
                    {
                        "type": "response.content_part.added",
                        "item_id": item.id,
                        "output_index": state.open.index,
                        "content_index": 0,
                        "part": OutputText(text="").model_dump(),
                    },
                ]
            state.open.text += piece.text
            if piece.text:
                events.append(
                    {
                        "type": "response.output_text.delta",
                        "item_id": state.open.item.id,
                        "output_index": state.open.index,
                        "content_index": 0,
                        "delta": piece.text,
                        "logprobs": [],
                    }
                )
        elif isinstance(piece, CallStart):
            events += self._close(state)
            item = OutputFunctionCall(
                call_id=piece.id, name=piece.name, arguments="", status="in_progress"
            )
            state.open = _Open(len(state.items), item)
            events.append(self._added(state.open))
        elif state.open is not None:  # arguments of the open call
            state.open.text += piece.text
            events.append(
                {
                    "type": "response.function_call_arguments.delta",
                    "item_id": state.open.item.id,
                    "output_index": state.open.index,
                    "delta": piece.text,
                }
            )
        return events

    def _added(self, open_: _Open) -> dict[str, Any]:
        return {
            "type": "response.output_item.added",
            "output_index": open_.index,
            "item": open_.item.model_dump(mode="json"),
        }

    def _close(self, state: _StreamState) -> list[dict[str, Any]]:
        open_, state.open = state.open, None
        if open_ is None:
            return []
        status = "incomplete" if state.finish_reason == "length" else "completed"
        item, at = open_.item, open_.index
        events: list[dict[str, Any]] = []
        if isinstance(item, OutputMessage):
            part = OutputText(text=open_.text)
            item.content = [part]
            events += [
                {
                    "type": "response.output_text.done",
                    "item_id": item.id,
                    "output_index": at,
                    "content_index": 0,
                    "text": open_.text,
                    "logprobs": [],
                },
                {
                    "type": "response.content_part.done",
                    "item_id": item.id,
                    "output_index": at,
                    "content_index": 0,
                    "part": part.model_dump(),
                },
            ]
        else:
            item.arguments = open_.text
            events.append(
                {
                    "type": "response.function_call_arguments.done",
                    "item_id": item.id,
                    "output_index": at,
                    "arguments": open_.text,
                }
            )
        item.status = status
        state.items.append(item)
        done = {"type": "response.output_item.done", "output_index": at}
        return [*events, {**done, "item": item.model_dump(mode="json")}]


def _as_message(items: list[OutputItem]) -> ChatMessage:
    """A response's output as the assistant turn of the stored conversation."""
    text = "".join(p.text for i in items if isinstance(i, OutputMessage) for p in i.content)
    calls = [
        ToolCall(id=i.call_id, function=FunctionCall(name=i.name, arguments=i.arguments or "{}"))
        for i in items
        if isinstance(i, OutputFunctionCall)
    ]
    return ChatMessage(role="assistant", content=text or None, tool_calls=calls or None)
