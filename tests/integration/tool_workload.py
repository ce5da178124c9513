"""Shared by the tool-calling and structured-output end-to-end tests: tools, schemas,
prompts, the openai client, bounded concurrency and the reply checks."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.integration.conftest import MODEL

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
