"""Tools and structured output for one request: the prompt the model sees and the grammar
its output must match.

Prompt: a model whose chat template takes `tools` (Qwen2.5, Hermes-style templates) gets
them through its template. Any other (the default SmolLM2) gets them in the Hermes / Qwen2.5
system prompt (`<tools>…</tools>`); assistant tool calls are rendered as
`<tool_call>{"name": …, "arguments": {…}}</tool_call>` and tool results as
`<tool_response>` user turns, the format vLLM's `hermes` and SGLang's `qwen25` parsers read.

Grammar (llguidance Lark, `engine/structured.py`), by `tool_choice`:
- `required` / a named function: only calls (one, or several with `parallel_tool_calls`),
  each a call to a listed function whose arguments match its JSON schema;
- `auto`: free text, or text followed by calls (each call constrained the same way);
- `none`: text that never opens a call.
With `response_format` json the text is the JSON value instead. Every tool's arguments are
constrained, `strict` or not: a call the server returns always parses and validates.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from app.api.errors import BadRequestError
from app.api.messages import ChatMessage, NamedToolChoice, ResponseFormat, Tool
from app.api.schemas import ChatCompletionRequest
from app.tool_parser import CLOSE, OPEN
from engine.structured import json_value

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
_TEXT = r"/(.|\n)*/"
_TEXT_WITHOUT_CALL = r"/(.|\n)*/ & ~/(.|\n)*<tool_call>(.|\n)*/"

HERMES_SYSTEM = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What a request asks for: which tools may be called, how, and the output grammar."""

    tools: tuple[Tool, ...] = ()
    choice: str = "none"  # none | auto | required | the named function
    parallel: bool = True
    grammar: str | None = None  # None: unconstrained

    @property
    def calls_possible(self) -> bool:
        return calls_possible(self.tools, self.choice)


def calls_possible(tools: Sequence[object] | None, choice: object) -> bool:
    """Whether a reply may hold tool calls (its text is then parsed for them)."""
    return bool(tools) and choice != "none"


def plan_tools(request: ChatCompletionRequest) -> ToolPlan:
    """Check tools, tool_choice and the messages' calls against each other; build the grammar.

    Raises:
        BadRequestError: naming the field (tool_choice, tools, messages).
    """
    tools = tuple(request.tools or ())
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise BadRequestError(
            "tool names must be unique", param="tools", code="duplicate_tool_name"
        )
    choice = request.tool_choice
    if choice is not None and choice != "none" and not tools:
        raise BadRequestError(
            "tool_choice needs tools", param="tool_choice", code="invalid_tool_choice"
        )
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise BadRequestError(
                f"tool_choice names {choice.function.name!r}, which is not in tools",
                param="tool_choice",
                code="unknown_tool",
            )
        chosen = choice.function.name
    else:
        chosen = choice or ("auto" if tools else "none")
    _check_tool_messages(request.messages)
    plan = ToolPlan(tools, chosen, request.parallel_tool_calls)
    grammar = output_grammar(plan, request.response_format)
    return ToolPlan(tools, chosen, request.parallel_tool_calls, grammar)


def output_grammar(plan: ToolPlan, response_format: ResponseFormat | None) -> str | None:
    """The llguidance grammar of the whole output (None: unconstrained)."""
    schema = response_format.schema_of_output() if response_format else None
    text = json_value(schema) if schema is not None else None
    if not plan.tools:
        return None if text is None else f"start: {text}\n"
    if plan.choice == "none":
        return f"start: {text or 'TEXT'}\nTEXT: {_TEXT_WITHOUT_CALL}\n"
    allowed = plan.tools if plan.choice in ("auto", "required") else _named(plan)
    rules = _call_rules(allowed)
    many = plan.parallel and plan.choice in ("auto", "required")
    if plan.choice != "auto":
        start = 'call ("\\n" call)*' if many else "call"
    elif text is not None:  # auto + json: the JSON value, or calls
        start = f'{text} | call ("\\n" call)*' if many else f"{text} | call"
    else:  # auto: free text, then calls (the lazy trigger ends the text at the first call)
        start = "(trig body)* TEXT" if many else "TEXT | trig body"
    return (
        "%llguidance {}\n"
        f"start: {start}\n"
        f"call: {json.dumps(OPEN)} body\n"
        f"trig[lazy]: TRIG_TEXT {json.dumps(OPEN)}\n"
        f"TRIG_TEXT: {_TEXT}\n"
        f"TEXT: {_TEXT_WITHOUT_CALL}\n"
        f'body: "\\n" fn "\\n" {json.dumps(CLOSE)}\n'
        f"fn: {' | '.join(f'fn_{i}' for i in range(len(allowed)))}\n" + rules
    )


def _named(plan: ToolPlan) -> tuple[Tool, ...]:
    return tuple(t for t in plan.tools if t.function.name == plan.choice)


def _call_rules(tools: tuple[Tool, ...]) -> str:
    """One rule per function: its name as a literal, its arguments as their JSON schema
    (each schema stays a root, so its `$ref`s resolve)."""
    rules = []
    for i, tool in enumerate(tools):
        head = json.dumps(f'{{"name": "{tool.function.name}", "arguments": ')
        args = json_value(tool.function.parameters or NO_ARGUMENTS)
        rules.append(f'fn_{i}: {head} {args} "}}"\n')
    return "".join(rules)


def _check_tool_messages(messages: list[ChatMessage]) -> None:
    called: set[str] = set()
    for i, m in enumerate(messages):
        if m.role == "assistant":
            for call in m.tool_calls or ():
                try:
                    json.loads(call.function.arguments or "{}")
                except ValueError:
                    raise BadRequestError(
                        "tool call arguments must be a JSON string",
                        param=f"messages[{i}].tool_calls",
                        code="invalid_tool_message",
                    ) from None
                called.add(call.id)
        elif m.tool_calls:
            raise BadRequestError(
                "only assistant messages carry tool_calls",
                param=f"messages[{i}].tool_calls",
                code="invalid_tool_message",
            )
        if m.role == "tool" and (m.tool_call_id is None or m.tool_call_id not in called):
            raise BadRequestError(
                f"tool message {i} answers no earlier tool call (tool_call_id {m.tool_call_id!r})",
                param=f"messages[{i}].tool_call_id",
                code="invalid_tool_message",
            )


# ---------------------------------------------------------------------- the prompt
def template_messages(
    messages: list[ChatMessage], tools: tuple[Tool, ...], native: bool
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages, extra template variables) for the chat template. `native`: the template
    renders tools itself (it reads `tools`); else the Hermes system prompt carries them."""
    if native:
        rendered = [_native(m) for m in messages]
        return rendered, (
            {"tools": [t.model_dump(exclude_none=True) for t in tools]} if tools else {}
        )
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.role == "tool":
            text = f"<tool_response>\n{m.text()}\n</tool_response>"
            if out and out[-1].get("tool_results"):  # consecutive results: one user turn
                out[-1]["content"] += "\n" + text
            else:
                out.append({"role": "user", "content": text, "tool_results": True})
            continue
        content = m.text()
        if m.tool_calls:
            calls = [
                f'{OPEN}\n{{"name": "{c.function.name}", "arguments": '
                f"{c.function.arguments or '{}'}}}\n{CLOSE}"
                for c in m.tool_calls
            ]
            content = "\n".join([content, *calls] if content else calls)
        out.append({"role": m.role, "content": content})
    for m in out:
        m.pop("tool_results", None)
    if tools:
        listing = "\n".join(json.dumps(t.model_dump(exclude_none=True)) for t in tools)
        block = HERMES_SYSTEM.format(tools=listing)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out, {}


def _native(m: ChatMessage) -> dict[str, Any]:
    d: dict[str, Any] = {"role": m.role, "content": m.text()}
    if m.tool_calls:
        d["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {
                    "name": c.function.name,
                    "arguments": json.loads(c.function.arguments or "{}"),
                },
            }
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        d["tool_call_id"] = m.tool_call_id
    return d
