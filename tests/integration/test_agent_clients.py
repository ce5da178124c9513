"""Real, unmodified agent clients against the real Serve app.

- The OpenAI Agents SDK runs an agent loop with two function tools to its end, through
  `OpenAIChatCompletionsModel` (/v1/chat/completions) and `OpenAIResponsesModel`
  (/v1/responses; also chained with `previous_response_id`), with `Runner.run` and
  `Runner.run_streamed`.
- LangChain's `ChatOpenAI` (chat completions and `use_responses_api`): `bind_tools` with
  `tool_choice="required"` (invoke and stream) and `with_structured_output(json_schema)`.

The model (SmolLM2-135M) is tiny, so the loop is made to end whatever it says: the first
turn must call a tool (`tool_choice="required"`, a grammar-constrained call), the SDK then
resets tool_choice (`reset_tool_choice`) so the second turn may answer in text, and a
`tool_use_behavior` ends the run at the second tool round if the model calls again. Either
way the run is exactly two model calls, the second one carrying the tool's output. Greedy
decoding (temperature 0) keeps each run the same from one session to the next. The wire is
recorded (httpx event hooks on the client's own transport) so a failure shows what was sent.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, get_type_hints

import httpx
import pytest
from pydantic import BaseModel, Field

from tests.integration.conftest import MODEL

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    # the clients exercise the API surface, not the KV transfer: one transport is enough
    pytest.mark.parametrize("serve_app", ["nixl"], indirect=True),
]

INSTRUCTIONS = "You answer weather questions. Use the tools."
QUESTION = "What is the weather in Paris today?"
TIMEOUT_S = 60.0


# ---------------------------------------------------------------------- OpenAI Agents SDK
class Wire:
    """The JSON bodies of the requests a client sent (request hook on its httpx client)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, request: httpx.Request) -> None:
        await request.aread()
        self.bodies.append(json.loads(request.content or b"{}"))

    def client(self):
        from openai import AsyncOpenAI

        http = httpx.AsyncClient(event_hooks={"request": [self]}, timeout=TIMEOUT_S)
        return AsyncOpenAI(base_url=self.url, api_key="x", max_retries=0, http_client=http)


def weather_agent(model, executed: list[tuple[str, Any]], rounds: list[list[Any]]):
    """The agent: two tools that record their calls; ends at the latest on tool round two."""
    agents = pytest.importorskip("agents")

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        executed.append(("get_weather", city))
        return f"{city}: sunny, 21 C"

    @agents.function_tool
    def convert_temperature(celsius: float) -> str:
        """Convert a temperature in degrees Celsius to degrees Fahrenheit."""
        executed.append(("convert_temperature", celsius))
        return f"{celsius * 9 / 5 + 32:.1f} F"

    def stop_at_second_round(ctx, results) -> agents.ToolsToFinalOutputResult:
        rounds.append([r.output for r in results])
        if len(rounds) < 2:  # feed the first round's outputs back to the model
            return agents.ToolsToFinalOutputResult(is_final_output=False)
        return agents.ToolsToFinalOutputResult(is_final_output=True, final_output=rounds[-1][-1])

    return agents.Agent(
        name="weather",
        instructions=INSTRUCTIONS,
        model=model,
        tools=[get_weather, convert_temperature],
        model_settings=agents.ModelSettings(
            tool_choice="required",  # turn one: a call, whatever the model would say
            temperature=0.0,
            max_tokens=96,
            parallel_tool_calls=False,  # one call per turn: the output always ends in time
        ),
        reset_tool_choice=True,  # turn two: tool_choice unset (auto): text or a call
        tool_use_behavior=stop_at_second_round,
    )


SIGNATURES = {"get_weather": {"city": str}, "convert_temperature": {"celsius": float}}


def check_executed(executed: list[tuple[str, Any]]) -> None:
    assert executed, "no tool ran"
    for name, arg in executed:
        (want,) = SIGNATURES[name].values()
        assert isinstance(arg, want), (name, arg)
        if want is str:
            assert arg.strip(), (name, arg)


def check_run(result, executed, rounds, wire: Wire, api: str) -> None:
    from agents import MessageOutputItem, ToolCallItem, ToolCallOutputItem

    check_executed(executed)
    kinds = [type(item) for item in result.new_items]
    assert ToolCallItem in kinds and ToolCallOutputItem in kinds, kinds
    for item in result.new_items:
        if isinstance(item, ToolCallItem):
            raw = item.raw_item
            raw = raw if isinstance(raw, dict) else raw.model_dump()
            assert raw["name"] in SIGNATURES, raw
            assert set(json.loads(raw["arguments"])) == set(SIGNATURES[raw["name"]]), raw
    outputs = [item.output for item in result.new_items if isinstance(item, ToolCallOutputItem)]
    assert outputs == [out for r in rounds for out in r]
    assert result.final_output is not None
    if kinds[-1] is MessageOutputItem:  # the model answered in turn two
        assert isinstance(result.final_output, str) and len(rounds) == 1
    else:  # it called again: the run stopped at round two with that tool's output
        assert len(rounds) == 2 and result.final_output == rounds[-1][-1]

    # exactly two model calls; the second one carried the first round's output
    assert len(result.raw_responses) == 2
    assert len(wire.bodies) == 2, [b.get("input", b.get("messages")) for b in wire.bodies]
    first, second = wire.bodies
    assert first["tool_choice"] == "required" and "tool_choice" not in second
    call_ids = [
        (c.raw_item if isinstance(c.raw_item, dict) else c.raw_item.model_dump())["call_id"]
        for c in result.new_items
        if isinstance(c, ToolCallItem)
    ]
    if api == "chat":
        tool_messages = [m for m in second["messages"] if m["role"] == "tool"]
        assert [m["tool_call_id"] for m in tool_messages] == call_ids[:1]
        assert tool_messages[0]["content"] == rounds[0][0]
    else:
        fed = [i for i in second["input"] if i.get("type") == "function_call_output"]
        assert [i["call_id"] for i in fed] == call_ids[:1]
        assert fed[0]["output"] == rounds[0][0]
        if api == "responses-chained":  # only the new item, on top of the stored response
            assert second["previous_response_id"] == result.raw_responses[0].response_id
            assert second["input"] == fed


def agents_model(api: str, client):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    if api == "chat":
        return agents.OpenAIChatCompletionsModel(model=MODEL, openai_client=client)
    return agents.OpenAIResponsesModel(model=MODEL, openai_client=client)


APIS = ["chat", "responses", "responses-chained"]


def run_options(api: str) -> dict[str, Any]:
    """`max_turns` only guards: the run takes two turns. Chained: each turn sends only the
    new items with `previous_response_id` (the server's stored conversation)."""
    return {"max_turns": 4, "auto_previous_response_id": api == "responses-chained"}


@pytest.mark.parametrize("api", APIS)
def test_agents_sdk_run_calls_a_tool_feeds_it_back_and_finishes(serve_app, api):
    agents = pytest.importorskip("agents")
    wire, executed, rounds = Wire(serve_app.openai_url), [], []

    async def main():
        agent = weather_agent(agents_model(api, wire.client()), executed, rounds)
        return await agents.Runner.run(agent, QUESTION, **run_options(api))

    result = asyncio.run(main())
    check_run(result, executed, rounds, wire, api)


@pytest.mark.parametrize("api", APIS)
def test_agents_sdk_streamed_run_to_its_end(serve_app, api):
    agents = pytest.importorskip("agents")
    wire, executed, rounds = Wire(serve_app.openai_url), [], []

    async def main():
        agent = weather_agent(agents_model(api, wire.client()), executed, rounds)
        run = agents.Runner.run_streamed(agent, QUESTION, **run_options(api))
        events = [event async for event in run.stream_events()]
        return run, events

    result, events = asyncio.run(main())
    assert result.is_complete
    check_run(result, executed, rounds, wire, api)
    raw = [e.data.type for e in events if isinstance(e, agents.RawResponsesStreamEvent)]
    assert raw.count("response.completed") == 2, raw  # one per model call, each to its end
    assert "response.function_call_arguments.delta" in raw, raw
    names = [e.name for e in events if isinstance(e, agents.RunItemStreamEvent)]
    assert names.index("tool_called") < names.index("tool_output"), names


# ---------------------------------------------------------------------- LangChain
def lc_tools():
    tools = pytest.importorskip("langchain_core.tools")

    @tools.tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return f"{city}: sunny, 21 C"

    @tools.tool
    def convert_temperature(celsius: float) -> float:
        """Convert a temperature in degrees Celsius to degrees Fahrenheit."""
        return celsius * 9 / 5 + 32

    return [get_weather, convert_temperature]


def chat_openai(app, responses_api: bool):
    lc = pytest.importorskip("langchain_openai")
    return lc.ChatOpenAI(
        base_url=app.openai_url,
        api_key="x",
        model=MODEL,
        temperature=0,
        max_tokens=128,
        max_retries=0,
        timeout=TIMEOUT_S,
        use_responses_api=responses_api,
    )


def check_lc_calls(message, tools) -> list[tuple[str, dict]]:
    """The message's tool calls as (name, args); each names a tool and fits its signature."""
    by_name = {t.name: t for t in tools}
    assert message.tool_calls, message
    assert not message.invalid_tool_calls, message.invalid_tool_calls
    calls = []
    for call in message.tool_calls:
        assert call["name"] in by_name, call
        tool = by_name[call["name"]]
        params = get_type_hints(tool.func)
        params.pop("return")
        assert set(call["args"]) == set(params), call  # strict: exactly the parameters
        for key, value in call["args"].items():
            want = (int, float) if params[key] is float else params[key]  # JSON numbers
            assert isinstance(value, want) and not isinstance(value, bool), call
        tool.invoke(call["args"])  # the tool itself accepts them
        assert call["id"], call
        calls.append((call["name"], call["args"]))
    return calls


@pytest.mark.parametrize("responses_api", [False, True], ids=["chat", "responses"])
def test_langchain_bind_tools_required_invoke_and_stream(serve_app, responses_api):
    messages = pytest.importorskip("langchain_core.messages")
    tools = lc_tools()
    llm = chat_openai(serve_app, responses_api).bind_tools(
        tools, tool_choice="required", strict=True
    )
    for question in (QUESTION, "Convert 25 degrees Celsius to Fahrenheit."):
        whole = llm.invoke(question)
        assert isinstance(whole, messages.AIMessage)
        want = check_lc_calls(whole, tools)

        chunks = list(llm.stream(question))
        assert len(chunks) > 1 and all(isinstance(c, messages.AIMessageChunk) for c in chunks)
        streamed = chunks[0]
        for chunk in chunks[1:]:
            streamed += chunk
        # greedy and grammar-constrained: the stream assembles the very same calls
        assert check_lc_calls(streamed, tools) == want


class City(BaseModel):
    name: str = Field(description="the city's name", max_length=24)
    country: str = Field(max_length=24)
    is_capital: bool


@pytest.mark.parametrize("responses_api", [False, True], ids=["chat", "responses"])
def test_langchain_structured_output_json_schema(serve_app, responses_api):
    llm = chat_openai(serve_app, responses_api)
    city = llm.with_structured_output(City, method="json_schema").invoke(
        "Describe Paris as JSON: its name, its country and whether it is a capital."
    )
    assert isinstance(city, City)
    assert city.name.strip() and city.country.strip()
