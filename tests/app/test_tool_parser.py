"""The streaming tool-call parser: any chunking of a reply gives the same content and calls
as the whole reply, and fragments reassemble the arguments exactly."""

from __future__ import annotations

import json
import random

import pytest

from app.tool_parser import Arguments, CallStart, Content, ToolCallParser, parse

TWO_CALLS = (
    "Let me look that up.<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Pa}ris {x}", "n": {"a": [1, {"b": "}"}]}}}'
    "\n</tool_call>\n<tool_call>\n"
    '{"name": "search", "arguments": {"q": "<tool_call> \\"quoted\\" }} </tool_call"}}'
    "\n</tool_call>"
)


def _chunked(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 40))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def _replay(pieces: list[str]) -> tuple[str, list[str], dict[int, str], list[str]]:
    parser = ToolCallParser()
    events = [e for piece in pieces for e in parser.feed(piece)] + parser.finish()
    content = "".join(e.text for e in events if isinstance(e, Content))
    names = [e.name for e in events if isinstance(e, CallStart)]
    ids = [e.id for e in events if isinstance(e, CallStart)]
    args: dict[int, str] = {}
    for e in events:
        if isinstance(e, Arguments):
            args[e.index] = args.get(e.index, "") + e.text
    return content, names, args, ids


def test_a_whole_reply_with_two_calls_and_braces_in_strings():
    content, calls = parse(TWO_CALLS)
    assert content == "Let me look that up."
    assert [c.name for c in calls] == ["get_weather", "search"]
    assert json.loads(calls[0].arguments) == {"city": "Pa}ris {x}", "n": {"a": [1, {"b": "}"}]}}
    assert json.loads(calls[1].arguments) == {"q": '<tool_call> "quoted" }} </tool_call'}
    assert len({c.id for c in calls}) == 2


@pytest.mark.parametrize(
    "text",
    [
        TWO_CALLS,
        "plain text with a <tool_ fragment and < signs",
        '<tool_call>\n{"arguments": {"x": 1}, "name": "f"}\n</tool_call> and after',
        '<tool_call>\n{"name": "f", "arguments": {"x": "cut off mid-str',
        '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n\n',
        '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_call>\n{"na',
    ],
)
def test_random_chunkings_reassemble_exactly(text):
    content, calls = parse(text)
    for seed in range(300):
        got_content, names, args, ids = _replay(_chunked(text, random.Random(seed)))
        assert got_content == content
        assert names == [c.name for c in calls]
        assert [args.get(i, "") for i in range(len(calls))] == [c.arguments for c in calls]
        assert len(set(ids)) == len(ids)


def test_the_name_comes_before_any_argument_fragment():
    parser = ToolCallParser()
    events = parser.feed('<tool_call>\n{"name": "get_weather", "arguments": {"ci')
    assert isinstance(events[0], CallStart) and events[0].name == "get_weather"
    assert all(isinstance(e, Arguments) for e in events[1:])


def test_a_call_cut_before_its_name_is_dropped_not_content():
    whole = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n'
    content, calls = parse(whole + '<tool_call>\n{"name": "sea')
    assert content == "" and [c.name for c in calls] == ["f"]


def test_text_that_is_not_a_call_stays_content():
    content, calls = parse("<tool_call>\nnot json at all\n</tool_call>")
    assert calls == []
    assert content == "<tool_call>\nnot json at all\n</tool_call>"
