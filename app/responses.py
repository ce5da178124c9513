"""The Responses API on the one request path: a request maps onto a chat request
(`to_chat`), runs as one, and `ResponsesFormat` shapes its outputs into a `response`
object or its typed event stream.

`store` keeps a bounded, tenant-scoped record of each response: the conversation so far
(input items as messages, plus this output) and its exact token ids (prompt + output). A
follow-up with `previous_response_id` renders the whole conversation through the template
and, where the rendering extends the stored text, continues from the stored tokens
themselves: the next prompt starts with exactly the KV the last turn computed (a prefix-
cache or KV-store hit, the DualPath case) instead of a re-tokenisation that may differ.
"""

from __future__ import annotations

from app.api.errors import BadRequestError
from app.api.messages import (
    ChatMessage,
    FunctionCall,
    FunctionDef,
    JsonSchemaSpec,
    NamedFunction,
    NamedToolChoice,
    ResponseFormat,
    Tool,
    ToolCall,
)
from app.api.responses import (
    FunctionCallItem,
    FunctionCallOutputItem,
    ResponsesRequest,
)
from app.api.schemas import ChatCompletionRequest, StreamOptions
from app.response_store import ResponseStore
from app.responses_format import ResponsesFormat


# ---------------------------------------------------------------------- request → chat
def input_messages(request: ResponsesRequest) -> list[ChatMessage]:
    """The request's `input` as chat messages (function calls join their assistant turn)."""
    if isinstance(request.input, str):
        return [ChatMessage(role="user", content=request.input)]
    out: list[ChatMessage] = []
    for item in request.input:
        if isinstance(item, FunctionCallItem):
            call = ToolCall(
                id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments)
            )
            last = out[-1] if out else None
            if last is not None and last.role == "assistant":
                last.tool_calls = [*(last.tool_calls or []), call]
            else:
                out.append(ChatMessage(role="assistant", tool_calls=[call]))
        elif isinstance(item, FunctionCallOutputItem):
            out.append(ChatMessage(role="tool", content=item.output, tool_call_id=item.call_id))
        else:
            out.append(ChatMessage(role=item.role, content=item.text()))
    return out


def to_chat(
    request: ResponsesRequest, history: list[ChatMessage]
) -> tuple[ChatCompletionRequest, list[ChatMessage]]:
    """(the chat request to run, the conversation to store: history + input)."""
    conversation = [*history, *input_messages(request)]
    head = [ChatMessage(role="system", content=request.instructions)]
    messages = [*head, *conversation] if request.instructions else conversation
    choice = request.tool_choice
    if not request.tools and choice in ("auto", "none"):
        choice = None  # clients send "auto" with no tools: nothing to choose
    fmt = request.text.format if request.text else None
    chat = ChatCompletionRequest(
        model=request.model,
        messages=messages,
        tools=[
            Tool(
                type="function",
                function=FunctionDef(
                    name=t.name, description=t.description, parameters=t.parameters, strict=t.strict
                ),
            )
            for t in request.tools or ()
        ]
        or None,
        tool_choice=NamedToolChoice(type="function", function=NamedFunction(name=choice.name))
        if choice is not None and not isinstance(choice, str)
        else choice,
        parallel_tool_calls=request.parallel_tool_calls,
        response_format=None
        if fmt is None
        else ResponseFormat(
            type=fmt.type,
            json_schema=JsonSchemaSpec(name=fmt.name or "output", schema=fmt.schema_)
            if fmt.type == "json_schema"
            else None,
        ),
        max_tokens=request.max_output_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        speculative=request.speculative,
        stream=request.stream,
        stream_options=StreamOptions(include_usage=True) if request.stream else None,
        service_tier=request.service_tier,
        user=request.user,
    )
    return chat, conversation


class Responses:
    """Binds Responses requests to the store: each request gets its own ResponsesFormat."""

    def __init__(self, store: ResponseStore | None = None):
        self.store = store or ResponseStore()

    def bind(
        self, request: ResponsesRequest, tenant: str
    ) -> tuple[ChatCompletionRequest, ResponsesFormat]:
        """Raises NotFoundError (previous_response_id), BadRequestError."""
        if unsupported := request.unsupported_fields():
            raise BadRequestError(
                f"{unsupported[0]} is not supported by this server",
                param=unsupported[0],
                code="unsupported_parameter",
            )
        history: list[ChatMessage] = []
        continues = None
        if request.previous_response_id is not None:
            previous = self.store.get(request.previous_response_id, tenant)
            history, continues = previous.messages, list(previous.token_ids)
        chat, conversation = to_chat(request, history)
        return chat, ResponsesFormat(request, self.store, tenant, conversation, continues)
