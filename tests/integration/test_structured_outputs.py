"""Structured outputs end to end (json_schema / json_object on chat and completions), the
400s naming the field, and plain requests unchanged beside structured ones: the real Serve
app with the official openai client (httpx for error bodies). See test_tool_calls.py's
NOTE on unbounded outputs."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest

from tests.integration.conftest import MODEL
from tests.integration.tool_workload import (
    JSON_IN_FLIGHT,
    ONE_TRANSPORT,
    PERSON,
    PERSON_FORMAT,
    SEEDS,
    TOOLS,
    calls_of,
    chat,
    check_calls,
    check_json,
    client,
    gather,
    person_request,
    tool,
    tool_request,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


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
