"""The speculative benchmark's traces: chat turns built here from real text, no downloads.

- `code-edit`: agentic code-edit turns over small standard-library functions (their own
  source, via `inspect.getsource`). Half ask to rewrite one line and reply with the whole
  function; half carry an earlier `edit_file` tool call in the history and ask for the same
  call on another line of the file, so the reply echoes the earlier arguments.
- `control`: open-ended prompts (stories, idea lists, explanations) with nothing to copy.

Each trace is deterministic: the same turns, in the same order, on every call.
"""

from __future__ import annotations

import importlib
import inspect
import itertools
import json
from dataclasses import dataclass

# (module, function): 10-40 lines of source each on CPython 3.11; a function whose source
# is unavailable (a frozen module) or outside that range is skipped.
FUNCTIONS = (
    ("textwrap", "indent"),
    ("shlex", "quote"),
    ("fnmatch", "fnmatch"),
    ("json.encoder", "py_encode_basestring_ascii"),
    ("string", "capwords"),
    ("colorsys", "rgb_to_hsv"),
    ("html", "escape"),
    ("heapq", "_siftup"),
    ("statistics", "median"),
    ("textwrap", "shorten"),
    ("shlex", "split"),
    ("fnmatch", "filter"),
    ("colorsys", "hsv_to_rgb"),
    ("statistics", "mode"),
    ("base64", "b16decode"),
    ("glob", "glob"),
    ("difflib", "restore"),
    ("statistics", "multimode"),
    ("colorsys", "rgb_to_hls"),
    ("heapq", "_siftdown"),
    ("textwrap", "wrap"),
    ("statistics", "median_low"),
    ("statistics", "geometric_mean"),
    ("difflib", "IS_LINE_JUNK"),
)
MIN_LINES, MAX_LINES = 10, 40
COMMENT = "  # reviewed"
STORY_TOPICS = (
    "a lighthouse keeper",
    "a lost robot",
    "a city under the sea",
    "a night train",
    "a desert garden",
    "a clockmaker's apprentice",
    "the first snow of the year",
    "a dragon who bakes bread",
    "an old violin",
    "a map with a missing corner",
    "a mountain village",
    "a comet seen from a farm",
)
IDEA_SUBJECTS = (
    "a rainy weekend",
    "a school science fair",
    "a small balcony garden",
    "naming a pet turtle",
    "a birthday party on a budget",
    "reducing food waste at home",
    "a team offsite",
    "a podcast about history",
    "learning to draw",
    "a neighbourhood library",
    "a cooperative board game",
    "a winter holiday",
)
WHY_QUESTIONS = (
    "the sky is blue",
    "bread rises",
    "cats purr",
    "leaves change colour in autumn",
    "the moon has phases",
    "rivers meander",
    "ice floats on water",
    "people dream",
    "music can give us chills",
    "bees dance",
    "stars twinkle",
    "tides rise and fall",
)


@dataclass(frozen=True, slots=True)
class Turn:
    """One request of a trace: chat messages, and the text its reply should repeat
    (`source`: a function's code for code-edit turns, "" for control turns)."""

    messages: tuple[dict[str, str], ...]
    source: str = ""


@dataclass(frozen=True, slots=True)
class Function:
    """A standard-library function's source, where it lives, and lines fit to edit."""

    name: str
    path: str
    source: str
    lines: tuple[str, ...]  # body statements (no docstring, blank or comment lines)


def load_functions() -> list[Function]:
    """The `FUNCTIONS` whose source is available and 10-40 lines long, in order."""
    found = []
    for module_name, name in FUNCTIONS:
        try:
            source = inspect.getsource(getattr(importlib.import_module(module_name), name))
        except (OSError, TypeError, AttributeError):
            continue
        if not MIN_LINES <= len(source.splitlines()) <= MAX_LINES:
            continue
        path = "Lib/" + module_name.replace(".", "/") + ".py"
        found.append(Function(name, path, source, _editable_lines(source)))
    return found


def _editable_lines(source: str) -> tuple[str, ...]:
    """Body lines outside the docstring that hold a statement worth a comment."""
    lines, in_doc = [], False
    for line in source.splitlines()[1:]:
        text = line.strip()
        quotes = text.count('"""') + text.count("'''")
        if in_doc or quotes:
            in_doc = in_doc != (quotes % 2 == 1)
            continue
        if len(text) >= 8 and not text.startswith("#") and line.startswith("    "):
            lines.append(line)
    return tuple(lines)


def _fenced(fn: Function) -> str:
    return f"Here is the function `{fn.name}` from `{fn.path}`:\n```python\n{fn.source}```\n"


def _rewrite_turn(fn: Function, kind: int) -> Turn:
    """Rewrite `fn` with one line changed; reply with the whole function."""
    if kind == 0 or not fn.lines:
        ask = f"Rewrite it with the function renamed to `{fn.name}_checked`"
    else:
        line = fn.lines[len(fn.lines) // 2]
        ask = (
            f"Rewrite it with the comment `{COMMENT.strip()}` added at the end of the line "
            f"`{line.strip()}`"
        )
    content = _fenced(fn) + ask + "; reply with the whole function."
    return Turn(({"role": "user", "content": content},), fn.source)


def _edit_call(fn: Function, line: str) -> str:
    arguments = {"path": fn.path, "old": line, "new": line + COMMENT}
    return json.dumps({"name": "edit_file", "arguments": arguments})


def _tool_turn(fn: Function) -> Turn:
    """An earlier `edit_file` call on one line of `fn`; ask for the same call on another."""
    first, second = fn.lines[0], fn.lines[-1]
    ask = (
        _fenced(fn) + f"Add the comment `{COMMENT.strip()}` to the line `{first.strip()}` "
        'with the edit_file tool: reply with one JSON object {"name": ..., "arguments": '
        '{"path": ..., "old": ..., "new": ...}}.'
    )
    follow = (
        "Done. Now call edit_file again on the same file for the line "
        f"`{second.strip()}`, with the same comment; reply with the tool call only."
    )
    messages = (
        {"role": "user", "content": ask},
        {"role": "assistant", "content": _edit_call(fn, first)},
        {"role": "user", "content": follow},
    )
    return Turn(messages, fn.source)


def code_edit_turns() -> list[Turn]:
    """Code-edit turns, kinds interleaved (rename, tool call, one-line comment, ...), so
    any prefix of the list mixes them."""
    turns = []
    for i, fn in enumerate(load_functions()):
        turns.append(_rewrite_turn(fn, kind=i % 2))
        if len(fn.lines) >= 2:
            turns.append(_tool_turn(fn))
    for i, fn in enumerate(load_functions()):  # the other rewrite kind of each function
        turns.append(_rewrite_turn(fn, kind=1 - i % 2))
    return turns


def control_turns() -> list[Turn]:
    """Open-ended prompts with no text to copy: stories, idea lists, explanations."""
    asks = zip(STORY_TOPICS, IDEA_SUBJECTS, WHY_QUESTIONS, strict=True)
    texts = itertools.chain.from_iterable(
        (
            f"Write a short story about {topic}.",
            f"List ideas for {subject}, one line each.",
            f"Explain in a few sentences why {question}.",
        )
        for topic, subject, question in asks
    )
    return [Turn(({"role": "user", "content": text},)) for text in texts]


TRACES = {"code-edit": code_edit_turns, "control": control_turns}


def take(turns: list[Turn], num: int) -> list[Turn]:
    """The first `num` turns, cycling with a varying suffix on the last message when the
    trace has fewer, so every request of a batch is distinct."""
    taken = []
    for i in range(num):
        turn = turns[i % len(turns)]
        if i >= len(turns):
            *head, last = turn.messages
            content = last["content"] + f" (variant {i // len(turns) + 1})"
            turn = Turn((*head, {**last, "content": content}), turn.source)
        taken.append(turn)
    return taken
