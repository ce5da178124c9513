"""Tool calls out of generated text (Hermes / Qwen2.5 format), incrementally.

    some text<tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

`ToolCallParser.feed(text)` takes text as it streams and returns events: content outside
the call markup, a call's start (its index, a fresh id, the name) as soon as the name is
complete, and argument fragments as they arrive. A whole reply is parsed by the same class
(`parse`), so streamed and non-streamed replies agree by construction: the concatenated
fragments are the non-streamed arguments, whatever the chunking.

Arguments are streamed as raw text; only what cannot be the end of the call object is
held back (a trailing `}`, whitespace, a partial `</tool_call>`). A reply cut by max_tokens
keeps a call cut inside its arguments (truncated, as OpenAI's); one cut before its name is
complete is dropped (it is markup, never content).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_HEADER = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


@dataclass(slots=True)
class Content:
    text: str


@dataclass(slots=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(slots=True)
class Arguments:
    index: int
    text: str


Event = Content | CallStart | Arguments


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


@dataclass(slots=True)
class ParsedCall:
    id: str
    name: str
    arguments: str = ""


@dataclass(slots=True)
class ToolCallParser:
    """One choice's text → events. `feed` as text arrives; `finish` once at the end."""

    buffer: str = ""
    in_call: bool = False
    calls: list[ParsedCall] = field(default_factory=list)
    _sent_args: str = ""  # the current call's arguments emitted so far
    _started: bool = False  # the current call's CallStart is out
    _space: str = ""  # whitespace after a call: content only if more text follows

    def feed(self, text: str) -> list[Event]:
        self.buffer += text
        events: list[Event] = []
        while True:
            if not self.in_call:
                at = self.buffer.find(OPEN)
                if at < 0:
                    keep = _partial_suffix(self.buffer, OPEN)
                    self._content(self.buffer[: len(self.buffer) - keep], events)
                    self.buffer = self.buffer[len(self.buffer) - keep :]
                    return events
                self._content(self.buffer[:at], events)
                self.buffer = self.buffer[at + len(OPEN) :]
                self.in_call, self._started, self._sent_args, self._space = True, False, "", ""
            else:
                at = self.buffer.find(CLOSE)
                body = self.buffer if at < 0 else self.buffer[:at]
                self._call_progress(body, complete=at >= 0, events=events)
                if at < 0:
                    return events
                self.buffer = self.buffer[at + len(CLOSE) :]
                self.in_call = False

    def finish(self) -> list[Event]:
        """The end of generation: flush what was held back (a cut-off call stays partial)."""
        events: list[Event] = []
        if self.in_call:
            self._call_progress(self.buffer, complete=False, events=events, final=True)
        else:
            self._content(self.buffer, events)
        self.buffer = ""
        return events

    # ------------------------------------------------------------------ internals
    def _content(self, text: str, events: list[Event]) -> None:
        if not text:
            return
        if self.calls and not text.strip():
            self._space += text  # between or after calls: markup unless text follows
            return
        events.append(Content(self._space + text))
        self._space = ""

    def _call_progress(
        self, body: str, complete: bool, events: list[Event], final: bool = False
    ) -> None:
        if not self._started:
            header = _HEADER.match(body)
            name = json.loads(f'"{header.group(1)}"') if header else None
            if name is None and complete:
                name, args = _whole_call(body)
                if name is None:  # not a call after all: the markup is content
                    self._content(f"{OPEN}{body}{CLOSE}", events)
                    return
                self._start(name, events)
                self._arguments(args, events)
                return
            if name is None:
                return  # (at the end: a call cut before its name is dropped, not text)
            self._start(name, events)
        header = _HEADER.match(body)
        raw = body[header.end() :] if header else ""
        if complete or final:
            args = raw.rstrip()
            if complete and args.endswith("}"):
                args = args[:-1].rstrip()
        else:
            args = raw[: len(raw) - _partial_suffix(raw, CLOSE)].rstrip()
            args = args[:-1] if args.endswith("}") else args
        if args.startswith(self._sent_args):
            self._arguments(args[len(self._sent_args) :], events)

    def _start(self, name: str, events: list[Event]) -> None:
        call = ParsedCall(new_call_id(), name)
        self.calls.append(call)
        self._started = True
        events.append(CallStart(len(self.calls) - 1, call.id, name))

    def _arguments(self, text: str, events: list[Event]) -> None:
        if text:
            self._sent_args += text
            self.calls[-1].arguments += text
            events.append(Arguments(len(self.calls) - 1, text))


def _whole_call(body: str) -> tuple[str | None, str]:
    """A complete call body in another key order: (name, arguments JSON) or (None, "")."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None, ""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None, ""
    args = obj.get("arguments", obj.get("parameters", {}))
    return obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def parse(text: str) -> tuple[str, list[ParsedCall]]:
    """A whole reply: (content outside the calls, the calls)."""
    parser = ToolCallParser()
    events = [*parser.feed(text), *parser.finish()]
    content = "".join(e.text for e in events if isinstance(e, Content))
    return content, parser.calls
