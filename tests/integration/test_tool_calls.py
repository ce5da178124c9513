"""Tool calling end to end: the real Serve app with the official openai
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

import json

import pytest

from app.tool_parser import OPEN
from tests.integration.conftest import MODEL, engines
from tests.integration.tool_workload import (
    ONE_TRANSPORT,
    SEEDS,
    TOOLS,
    calls_of,
    chat,
    check_calls,
    client,
    gather,
    streamed_chat,
    tool_request,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


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
            # a call cut before its name is dropped (never text); one cut inside its
            # arguments stays a call, truncated: only the calls before it must validate
            assert content is None, (seed, content)
            calls = calls[:-1]
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
