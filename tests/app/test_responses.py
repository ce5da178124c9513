"""The Responses API's pieces without engines: input items onto chat messages, the
tenant-scoped store, and the event stream agreeing with the whole response."""

from __future__ import annotations

import json
import random

import pytest

from app.api.errors import BadRequestError, NotFoundError
from app.api.replies import Usage
from app.api.responses import ResponsesRequest
from app.formats import Head
from app.request_meter import Choice
from app.response_store import ResponseStore
from app.responses import Responses, input_messages, to_chat
from engine.output import RequestOutput
from engine.sequence import FinishReason

TOOL = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
HEAD = Head(id="resp_1", created=1, model="m", service_tier="default")
REPLY = (
    "Checking.<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
    '{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
)


def req(**kw) -> ResponsesRequest:
    return ResponsesRequest.model_validate({"model": "m", "input": "hi", **kw})


def test_input_items_become_chat_messages():
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
        {"type": "message", "role": "assistant", "content": "Checking.", "id": "msg_1"},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "21C"},
        {"type": "function_call_output", "call_id": "c2", "output": "25C"},
    ]
    messages = input_messages(req(input=items))
    assert [m.role for m in messages] == ["user", "assistant", "tool", "tool"]
    assert messages[1].content == "Checking."
    assert [c.id for c in messages[1].tool_calls] == ["c1", "c2"]
    assert messages[3].tool_call_id == "c2" and messages[3].content == "25C"


def test_the_chat_request_carries_tools_choice_format_and_instructions():
    chat, conversation = to_chat(
        req(
            instructions="Be brief.",
            tools=[TOOL],
            tool_choice={"type": "function", "name": "get_weather"},
            text={"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
            max_output_tokens=7,
            stream=True,
        ),
        history=[],
    )
    assert chat.messages[0].role == "system" and chat.messages[0].content == "Be brief."
    assert [m.role for m in conversation] == ["user"]  # instructions are not carried over
    assert chat.tools[0].function.name == "get_weather"
    assert chat.tool_choice.function.name == "get_weather"
    assert chat.response_format.schema_of_output() == {"type": "object"}
    assert chat.max_tokens == 7 and chat.stream_options.include_usage


def test_the_store_is_tenant_scoped_and_bounded():
    store = ResponseStore(capacity=2)
    for i in range(3):
        store.put(f"r{i}", "acme", [], [i], None)  # type: ignore[arg-type]
    with pytest.raises(NotFoundError):
        store.get("r0", "acme")  # evicted
    assert list(store.get("r2", "acme").token_ids) == [2]
    with pytest.raises(NotFoundError) as info:
        store.get("r2", "other-tenant")
    assert info.value.param == "previous_response_id"


def test_the_store_keeps_within_its_token_budget():
    store = ResponseStore(max_tokens=100)
    for i in range(5):
        store.put(f"r{i}", "acme", [], list(range(40)), None)  # type: ignore[arg-type]
    assert store.num_tokens == 80 and len(store) == 2
    store.get("r4", "acme")
    with pytest.raises(NotFoundError):
        store.get("r2", "acme")


def test_bind_refuses_unknown_previous_ids_and_unsupported_fields():
    responses = Responses()
    with pytest.raises(NotFoundError):
        responses.bind(req(previous_response_id="resp-nope"), "acme")
    for field, value in [
        ("reasoning", {"effort": "high"}),
        ("truncation", "auto"),
        ("include", ["message.output_text.logprobs"]),
        ("max_tool_calls", 2),
        ("logit_bias", {"1": 3}),
    ]:
        with pytest.raises(BadRequestError) as info:
            responses.bind(req(**{field: value}), "acme")
        assert info.value.param == field
    # values that ask for nothing: what agent clients send by default
    harmless = {"reasoning": {"effort": None}, "truncation": "disabled", "metadata": {"a": "b"}}
    responses.bind(req(include=["reasoning.encrypted_content"], store=False, **harmless), "acme")


def _outputs(text: str, pieces: list[str], reason: FinishReason) -> list[RequestOutput]:
    outs = []
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        outs.append(
            RequestOutput("r", [i], piece, last, reason if last else None, 10, 0, i + 1, text=text)
        )
    return outs


@pytest.mark.parametrize("seed", range(20))
def test_stream_events_build_the_same_response_as_the_whole_reply(seed):
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(REPLY)), rng.randint(1, 30)))
    pieces = [REPLY[a:b] for a, b in zip([0, *cuts], [*cuts, len(REPLY)], strict=True)]
    usage = Usage.of(10, len(pieces), 0)

    whole_fmt = Responses().bind(req(tools=[TOOL]), "acme")[1]
    choice = Choice()
    for out in _outputs(REPLY, pieces, FinishReason.STOP):
        choice.add(out)
    whole = whole_fmt.response(HEAD, None, [choice], usage, None)

    responses = Responses()
    fmt = responses.bind(req(tools=[TOOL], stream=True), "acme")[1]
    state = fmt.stream_state(None)
    events = [e for e in fmt.opening(HEAD, None)]
    for out in _outputs(REPLY, pieces, FinishReason.STOP):
        events += fmt.delta(HEAD, None, 0, out, state) or []
    events += fmt.usage(HEAD, usage, None, state)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].model_extra["response"]
    strip = [{k: v for k, v in i.items() if k != "id"} for i in final["output"]]
    want = [{k: v for k, v in i.model_dump(mode="json").items() if k != "id"} for i in whole.output]
    assert [{**i, "call_id": None} for i in strip] == [{**i, "call_id": None} for i in want]
    args = "".join(
        e.model_extra["delta"]
        for e in events
        if e.type == "response.function_call_arguments.delta" and e.model_extra["output_index"] == 1
    )
    assert json.loads(args) == {"city": "Paris"}
    assert list(responses.store.get("resp_1", "acme").token_ids) == list(range(len(pieces)))


def test_a_reply_cut_by_max_output_tokens_is_incomplete():
    fmt = Responses().bind(req(), "acme")[1]
    choice = Choice()
    for out in _outputs("abc", ["a", "bc"], FinishReason.LENGTH):
        choice.add(out)
    response = fmt.response(HEAD, None, [choice], Usage.of(3, 2, 0), None)
    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].content[0].text == "abc"
