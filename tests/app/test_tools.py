"""Tools and structured output for one request: the checks (400s naming the field), the
prompt (Hermes system prompt, calls and results rendered), and the grammar each
tool_choice builds, run against texts it must accept or refuse."""

from __future__ import annotations

import pytest

from app.api.errors import BadRequestError
from app.api.messages import ResponseFormat
from app.api.schemas import ChatCompletionRequest
from app.tools import ToolPlan, output_grammar, plan_tools, template_messages
from engine.structured import GrammarCompiler
from engine.tokenizer import Tokenizer
from tests.helpers import write_tiny_tokenizer

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
SEARCH = {  # pydantic-style: the arguments schema refers to its own $defs
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {
            "$defs": {"Query": {"type": "object", "properties": {"q": {"type": "string"}}}},
            "type": "object",
            "properties": {"query": {"$ref": "#/$defs/Query"}},
            "required": ["query"],
        },
    },
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
SEARCH_CALL = '<tool_call>\n{"name": "search", "arguments": {"query": {"q": "ray"}}}\n</tool_call>'
USER = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def accepts(tmp_path_factory):
    """accepts(grammar, text): the grammar takes `text` as a whole output."""
    out = tmp_path_factory.mktemp("tok")
    vocab = write_tiny_tokenizer(out)
    tokenizer = Tokenizer(out)
    compiler = GrammarCompiler(out / "tokenizer.json", vocab, tokenizer.eos_token_ids)

    def check(grammar: str, text: str) -> bool:
        state = compiler.state(grammar)
        return state.advance(tokenizer.encode(text)) and state.is_complete

    return check


def request(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **kw})


def grammar(**kw) -> str:
    plan = plan_tools(request(**kw))
    assert plan.grammar is not None
    return plan.grammar


def test_required_takes_only_calls_to_listed_functions_with_valid_arguments(accepts):
    g = grammar(tools=[WEATHER, SEARCH], tool_choice="required")
    assert accepts(g, CALL)
    assert accepts(g, SEARCH_CALL)
    assert accepts(g, CALL + "\n" + SEARCH_CALL)  # parallel calls by default
    assert not accepts(g, "Sure! " + CALL)  # no text around required calls
    assert not accepts(g, CALL.replace("get_weather", "get_wether"))
    assert not accepts(g, CALL.replace('"Paris"', "42"))  # city must be a string
    assert not accepts(g, CALL.replace('"Paris"}', '"Paris", "extra": 1}'))
    assert not accepts(g, "")


def test_named_choice_and_parallel_false_give_one_call(accepts):
    named = grammar(
        tools=[WEATHER, SEARCH], tool_choice={"type": "function", "function": {"name": "search"}}
    )
    assert accepts(named, SEARCH_CALL)
    assert not accepts(named, CALL)
    assert not accepts(named, SEARCH_CALL + "\n" + SEARCH_CALL)
    single = grammar(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False)
    assert accepts(single, CALL)
    assert not accepts(single, CALL + "\n" + CALL)


def test_auto_takes_text_or_calls_but_never_a_malformed_call(accepts):
    g = grammar(tools=[WEATHER])
    assert accepts(g, "It is sunny in Paris.")
    assert accepts(g, "Let me check. " + CALL)
    assert accepts(g, CALL)
    assert not accepts(g, 'Let me check. <tool_call>\n{"name": "nope", "arguments": {}}')
    assert not accepts(g, "<tool_call>\nnot json\n</tool_call>")


def test_none_never_opens_a_call(accepts):
    g = grammar(tools=[WEATHER], tool_choice="none")
    assert accepts(g, "It is sunny.")
    assert not accepts(g, CALL)


def test_response_formats(accepts):
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer"}},
        "required": ["n"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    g = output_grammar(ToolPlan(), ResponseFormat.model_validate(fmt))
    assert accepts(g, '{"n": 3}')
    assert not accepts(g, '{"n": "3"}')
    assert not accepts(g, '{"n": 3} and more')
    obj = output_grammar(ToolPlan(), ResponseFormat(type="json_object"))
    assert accepts(obj, '{"anything": [1, 2]}')
    assert not accepts(obj, "[1, 2]")
    assert output_grammar(ToolPlan(), ResponseFormat(type="text")) is None
    assert plan_tools(request()).grammar is None  # no tools, no format: unconstrained


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
         "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        (
            {
                "messages": [
                    *USER,
                    {"role": "tool", "content": "21C", "tool_call_id": "call_missing"},
                ]
            },
            "messages[1].tool_call_id",
        ),
        (
            {
                "messages": [
                    *USER,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "c1", "type": "function",
                             "function": {"name": "get_weather", "arguments": "{not json"}}
                        ],
                    },
                ]
            },
            "messages[1].tool_calls",
        ),
    ],
)  # fmt: skip
def test_bad_tool_input_is_a_400_naming_the_field(body, param):
    with pytest.raises(BadRequestError) as info:
        plan_tools(request(**body))
    assert info.value.param == param


def test_hermes_prompt_renders_tools_calls_and_results():
    req = request(
        tools=[WEATHER],
        messages=[
            {"role": "system", "content": "Be brief."},
            *USER,
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "content": "21C", "tool_call_id": "c1"},
        ],
    )
    messages, extra = template_messages(req.messages, tuple(req.tools), native=False)
    assert extra == {}
    assert messages[0]["role"] == "system"
    assert messages[0]["content"].startswith("Be brief.\n\n# Tools")
    assert '"name": "get_weather"' in messages[0]["content"] and "<tools>" in messages[0]["content"]
    assert messages[2] == {"role": "assistant", "content": CALL}
    assert messages[3] == {"role": "user", "content": "<tool_response>\n21C\n</tool_response>"}


def test_a_template_with_tool_support_gets_them_itself():
    req = request(tools=[WEATHER])
    messages, extra = template_messages(req.messages, tuple(req.tools), native=True)
    assert messages == USER
    assert extra["tools"][0]["function"]["name"] == "get_weather"
