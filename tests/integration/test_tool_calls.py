"""Tool calling and structured outputs end to end: the real Serve app with the official openai
client (httpx for error bodies).

Every tool call and every JSON reply is grammar-constrained, so whatever the sampler picks
parses and validates: checked over many seeds at a high temperature. The seed loops run on
one transport (the grammar lives in the engines and the ingress, not in the KV transfer);
the multi-turn cache hit and completions run on both.

NOTE: with parallel calls allowed, the grammar admits another call (or the end) after each
call, and SmolLM2-135M at temperature 0.8 sometimes repeats calls until max_tokens: such a
reply ends "length" with its last call cut. So does a free `json_object`, whose strings are
unbounded. The tests assert the contract (finish "tool_calls" / "stop" whenever the model
stopped by itself, every complete call valid); where the grammar bounds the output (one
call, a bounded schema) they assert 100 %.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import jsonschema
import pytest
from openai import AsyncOpenAI, OpenAI

from app.tool_parser import OPEN
from tests.integration.conftest import MODEL, engines

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ONE_TRANSPORT = pytest.mark.parametrize("serve_app", ["nixl"], indirect=True)
SEEDS = range(20)
# requests in flight at once: admission holds prompt + max_tokens of decode KV per request
# (~2k tokens in all here), so more would only wait in its queue (408 after 120 s); a tool
# request holds ~700 (its prompt lists the tools), a JSON one ~170
IN_FLIGHT = 4
JSON_IN_FLIGHT = 10
SYSTEM = "You are a helpful assistant. Use the tools when they help."

# Compact schemas (the tools' JSON is in the prompt, and admission counts prompt +
# max_tokens against the decode engine's KV): every string is bounded, so calls stay short.
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
FLIGHTS = {
    "type": "object",
    "properties": {
        "origin": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "passengers": {"type": "integer", "minimum": 1, "maximum": 9},
    },
    "required": ["origin", "destination", "passengers"],
    "additionalProperties": False,
}
REMINDER = {
    "type": "object",
    "properties": {
        "text": {"type": "string", "minLength": 1, "maxLength": 32},
        "minutes": {"type": "integer", "minimum": 1, "maximum": 1440},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 2},
    },
    "required": ["text", "minutes"],
    "additionalProperties": False,
}


def tool(name: str, description: str, parameters: dict) -> dict:
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": parameters},
    }


TOOLS = [
    tool("get_weather", "Weather in a city.", WEATHER),
    tool("search_flights", "Flights between two airports (IATA codes).", FLIGHTS),
    tool("add_reminder", "Remind the user in some minutes.", REMINDER),
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
PROMPTS = [
    "What is the weather like in Lisbon today?",
    "Find me a flight from Paris to Tokyo for two people.",
    "Remind me to call my mother in 30 minutes.",
    "Is it cold in Oslo right now? I think in fahrenheit.",
    "I need to get from JFK to LHR next week, alone.",
]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "hobbies": {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": 16},
            "maxItems": 3,
        },
    },
    "required": ["name", "age", "hobbies"],
    "additionalProperties": False,
}
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}


def client(app) -> OpenAI:
    return OpenAI(base_url=app.openai_url, api_key="unused", max_retries=0, timeout=300)


def gather(app, make, limit: int = IN_FLIGHT) -> list:
    """Run the coroutines `make(api)` returns, `limit` at a time, on one AsyncOpenAI
    client; results in order."""

    async def main():
        api = AsyncOpenAI(base_url=app.openai_url, api_key="unused", max_retries=0, timeout=300)
        slots = asyncio.Semaphore(limit)

        async def one(coro):
            async with slots:
                return await coro

        async with api:
            return await asyncio.gather(*(one(c) for c in make(api)))

    return asyncio.run(main())


def chat(text: str, system: str = SYSTEM) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": text}]


def tool_request(seed: int, **overrides: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": chat(PROMPTS[seed % len(PROMPTS)]),
        "tools": TOOLS,
        "tool_choice": "required",
        "temperature": 0.8,
        "seed": seed,
        "max_tokens": 200,
    } | overrides


def person_request(seed: int, response_format: dict, max_tokens: int = 120) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": chat(
            f"Describe fictional person number {seed} as a small JSON object: a name, an age "
            "and a few hobbies.",
            system="You reply in JSON.",
        ),
        "response_format": response_format,
        "temperature": 0.8,
        "seed": seed,
        "max_tokens": max_tokens,
    }


def check_json(text: str, schema: dict) -> None:
    """`text` is JSON that validates against `schema`, its keys in the schema's order."""
    value = json.loads(text)
    jsonschema.validate(value, schema)
    if "properties" in schema:
        assert list(value) == [k for k in schema["properties"] if k in value], text


def check_calls(calls: list[dict]) -> None:
    """Each call names a listed tool and its arguments validate against its schema."""
    assert calls
    for call in calls:
        assert call["name"] in SCHEMAS, call
        check_json(call["arguments"], SCHEMAS[call["name"]])


def calls_of(message) -> list[dict]:
    return [
        {"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
        for c in message.tool_calls or ()
    ]


async def streamed_chat(api: AsyncOpenAI, **body: Any) -> tuple[str, list[dict], list[str]]:
    """(content, calls, finish reasons) reassembled from a stream's deltas, checking their
    shape: a call's first delta has its index, id, type and name; the rest only arguments."""
    stream = await api.chat.completions.create(**body, stream=True)
    content, calls, finish = "", {}, []
    async for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            for d in delta.tool_calls or ():
                if d.index not in calls:
                    assert d.index == len(calls), "calls are indexed in order from 0"
                    assert d.id and d.type == "function" and d.function.name, d
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
                else:
                    assert d.id is None and d.function.name is None, d
                calls[d.index]["arguments"] += d.function.arguments or ""
            if choice.finish_reason:
                finish.append(choice.finish_reason)
    return content, list(calls.values()), finish


# ---------------------------------------------------------------------- tool_choice
@ONE_TRANSPORT
def test_required_calls_listed_tools_with_valid_arguments_over_seeds(serve_app):
    """Every reply is calls only; finish "tool_calls" unless max_tokens cut it, and then
    only the last call may be incomplete."""
    replies = gather(
        serve_app, lambda api: [api.chat.completions.create(**tool_request(s)) for s in SEEDS]
    )
    finishes = []
    for seed, reply in zip(SEEDS, replies, strict=True):
        choice, used = reply.choices[0], reply.usage.completion_tokens
        calls, content = calls_of(choice.message), choice.message.content
        assert calls, (seed, choice.message)
        assert len({c["id"] for c in calls}) == len(calls) and all(c["id"] for c in calls)
        if choice.finish_reason == "length":
            assert used == 200, (seed, used)
            # NOTE: a call cut before its name is complete comes back as content (the
            # parser's choice, see tool_parser.py); one cut in its arguments stays a call
            if content is None:
                calls = calls[:-1]
            else:
                assert OPEN.startswith(content) or content.startswith(OPEN), content
        else:
            assert choice.finish_reason == "tool_calls", (seed, choice)
            assert content is None, (seed, content)
        if calls:
            check_calls(calls)
        finishes.append(choice.finish_reason)
    assert finishes.count("tool_calls") >= len(SEEDS) // 2, finishes  # the model does stop


@ONE_TRANSPORT
def test_required_without_parallel_calls_always_makes_one_valid_call(serve_app):
    replies = gather(
        serve_app,
        lambda api: [
            api.chat.completions.create(
                **tool_request(s, parallel_tool_calls=False, max_tokens=120)
            )
            for s in range(10)
        ],
    )
    for seed, reply in enumerate(replies):
        choice = reply.choices[0]
        calls = calls_of(choice.message)
        assert choice.finish_reason == "tool_calls" and len(calls) == 1, (seed, choice)
        assert choice.message.content is None
        check_calls(calls)


@ONE_TRANSPORT
def test_streamed_calls_equal_non_streamed(serve_app):
    """Same seed, same calls (names and arguments), streamed or not; the stream carries no
    content. Seeds 1-3 include replies with several calls (indexes 0, 1, …)."""
    seeds = [1, 2, 3]

    def both(api):
        return [api.chat.completions.create(**tool_request(s)) for s in seeds] + [
            streamed_chat(api, **tool_request(s)) for s in seeds
        ]

    replies = gather(serve_app, both)
    for seed, full, (content, calls, finish) in zip(
        seeds, replies[: len(seeds)], replies[len(seeds) :], strict=True
    ):
        choice = full.choices[0]
        assert finish == [choice.finish_reason] == ["tool_calls"], seed
        assert content == ""
        check_calls(calls)
        ids = {c["id"] for c in calls}
        assert not ids & {c["id"] for c in calls_of(choice.message)}  # fresh ids per reply
        strip = [(c["name"], c["arguments"]) for c in calls]
        assert strip == [(c["name"], c["arguments"]) for c in calls_of(choice.message)], seed
    assert max(len(r.choices[0].message.tool_calls) for r in replies[: len(seeds)]) >= 2


@ONE_TRANSPORT
def test_named_tool_choice_calls_exactly_that_function(serve_app):
    named = {"type": "function", "function": {"name": "search_flights"}}
    replies = gather(
        serve_app,
        lambda api: [
            api.chat.completions.create(**tool_request(s, tool_choice=named, max_tokens=120))
            for s in range(6)
        ],
    )
    for reply in replies:
        choice = reply.choices[0]
        calls = calls_of(choice.message)
        assert choice.finish_reason == "tool_calls" and len(calls) == 1, choice
        assert calls[0]["name"] == "search_flights"
        check_calls(calls)


@ONE_TRANSPORT
def test_tool_choice_none_answers_in_text(serve_app):
    replies = gather(
        serve_app,
        lambda api: [
            api.chat.completions.create(**tool_request(s, tool_choice="none", max_tokens=40))
            for s in range(4)
        ],
    )
    for reply in replies:
        choice = reply.choices[0]
        assert choice.message.tool_calls is None, choice
        assert choice.finish_reason in ("stop", "length")
        assert choice.message.content and OPEN not in choice.message.content


# ---------------------------------------------------------------------- response_format
@ONE_TRANSPORT
def test_json_schema_replies_parse_and_validate_over_seeds(serve_app):
    replies = gather(
        serve_app,
        lambda api: [
            api.chat.completions.create(**person_request(s, PERSON_FORMAT)) for s in SEEDS
        ],
        limit=JSON_IN_FLIGHT,
    )
    for seed, reply in zip(SEEDS, replies, strict=True):
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", (seed, choice)
        check_json(choice.message.content, PERSON)


@ONE_TRANSPORT
def test_json_object_replies_are_objects_over_seeds(serve_app):
    """Every reply that ends by itself is one JSON object; one cut by max_tokens starts one
    (its strings are unbounded: the model may ramble inside one)."""
    fmt = {"type": "json_object"}
    replies = gather(
        serve_app,
        lambda api: [
            api.chat.completions.create(**person_request(s, fmt, max_tokens=64)) for s in SEEDS
        ],
        limit=JSON_IN_FLIGHT,
    )
    finishes = []
    for seed, reply in zip(SEEDS, replies, strict=True):
        choice = reply.choices[0]
        finishes.append(choice.finish_reason)
        if choice.finish_reason == "length":
            assert reply.usage.completion_tokens == 64
            assert choice.message.content.startswith("{")
        else:
            assert choice.finish_reason == "stop", (seed, choice)
            jsonschema.validate(json.loads(choice.message.content), {"type": "object"})
    assert finishes.count("stop") >= len(SEEDS) // 2, finishes


def test_completions_response_format_json_schema(serve_app):
    replies = gather(
        serve_app,
        lambda api: [
            api.completions.create(
                model=MODEL,
                prompt="A person record in JSON:",
                temperature=0.8,
                seed=seed,
                max_tokens=120,
                extra_body={"response_format": PERSON_FORMAT},
            )
            for seed in range(4)
        ],
    )
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice
        check_json(choice.text, PERSON)


# ---------------------------------------------------------------------- errors
LOOK_BEHIND = {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)a"}}}
USER = [{"role": "user", "content": "hi"}]


@ONE_TRANSPORT
@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (
            {
                "messages": USER,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": LOOK_BEHIND},
                },
            },
            "response_format",
            "invalid_schema",
        ),
        (
            {"messages": USER, "tools": [tool("f", "", LOOK_BEHIND)], "tool_choice": "required"},
            "tools",
            "invalid_schema",
        ),
        (
            {
                "messages": USER,
                "tools": TOOLS,
                "tool_choice": {"type": "function", "function": {"name": "launch_rocket"}},
            },
            "tool_choice",
            "unknown_tool",
        ),
        (
            {
                "messages": [
                    *USER,
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": "call_1",
                                "type": "function",
                                "function": {"name": "get_weather", "arguments": "{}"},
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": "call_2", "content": "sunny"},
                ],
                "tools": TOOLS,
            },
            "messages[2].tool_call_id",
            "invalid_tool_message",
        ),
        ({"messages": USER, "logit_bias": {"50256": -100}}, "logit_bias", "unsupported_parameter"),
        (
            {
                "prompt": "x",
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": LOOK_BEHIND},
                },
            },
            "response_format",
            "invalid_schema",
        ),
    ],
    ids=[
        "unsupported-schema",
        "bad-tool-schema",
        "unknown-tool",
        "unanswered-tool-message",
        "logit_bias",
        "completions-unsupported-schema",
    ],
)
def test_bad_tools_and_formats_are_400s_naming_the_field(serve_app, body, param, code):
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
    r = httpx.post(f"{serve_app.base_url}{path}", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code), error


# ---------------------------------------------------------------------- the PD path
PLAIN = [
    "Name a colour.",
    "What is two plus two?",
    "Say hello to a friend.",
    "Give one word for happy.",
]


@ONE_TRANSPORT
def test_plain_greedy_requests_are_unchanged_by_structured_neighbours(serve_app):
    """A grammar masks its own rows only: plain greedy replies equal their lone runs."""

    def plain(api, text):
        return api.chat.completions.create(
            model=MODEL, messages=chat(text), temperature=0, max_tokens=24
        )

    api = client(serve_app)
    alone = [plain(api, text).choices[0] for text in PLAIN]

    def mixed(api):  # a structured request next to each plain one, all sent at once
        for i, text in enumerate(PLAIN):
            if i % 2:
                yield api.chat.completions.create(**person_request(i, PERSON_FORMAT))
            else:
                yield api.chat.completions.create(
                    **tool_request(i, parallel_tool_calls=False, max_tokens=120)
                )
            yield plain(api, text)

    replies = gather(serve_app, lambda api: list(mixed(api)), limit=2 * len(PLAIN))
    structured, together = replies[0::2], [r.choices[0] for r in replies[1::2]]
    for a, b in zip(alone, together, strict=True):
        assert (b.message.content, b.finish_reason) == (a.message.content, a.finish_reason)
    for i, reply in enumerate(structured):
        message = reply.choices[0].message
        if i % 2:
            check_json(message.content, PERSON)
        else:
            check_calls(calls_of(message))


def test_tool_loop_second_turn_hits_the_first_turns_kv(serve_app):
    """Turn 2 (the call and its result appended) re-reads turn 1's prompt from the cache."""
    api = client(serve_app)
    history = chat("What is the weather like in Madrid? Answer in one sentence.")
    first = api.chat.completions.create(
        **tool_request(0, messages=history, parallel_tool_calls=False, max_tokens=120)
    )
    (call,) = first.choices[0].message.tool_calls
    assert first.choices[0].finish_reason == "tool_calls"
    history += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"result": "sunny, 24"})},
    ]
    second = api.chat.completions.create(
        model=MODEL,
        messages=history,
        tools=TOOLS,
        tool_choice="none",
        temperature=0,
        max_tokens=40,
    )
    choice = second.choices[0]
    assert choice.message.tool_calls is None and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    block = engines("prefill")[0].block_size
    prev = first.usage.prompt_tokens
    assert second.usage.prompt_tokens > prev
    assert second.usage.prompt_tokens_details.cached_tokens >= (prev - 1) // block * block > 0
