"""Grammar-constrained decoding: a compiled grammar per request, a matcher per sequence, and
a packed token bitmask applied to the logits of structured rows only.

The backend is llguidance (grammars in its Lark dialect, JSON schemas inline with `%json`).
The seam is vLLM's: a packed `int32 [rows, ceil(vocab / 32)]` bitmask, bit `t % 32` of word
`t // 32` set when token `t` is allowed. A backend fills rows of it; `apply_bitmask` is
backend-free, so xgrammar (same layout) could replace llguidance behind `GrammarCompiler`.

Compiling happens off the engine thread (`GrammarCompiler.compile` from a worker) and is
cached by grammar text: the engine's tokenizer is fixed, so (grammar, tokenizer) is the key.
A sequence gets a copy of the compiled matcher, advanced by the tokens it already emitted,
so a PD handoff, a moved decode or a preempted sequence resumes in the same grammar state.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import InvalidRequestError

logger = logging.getLogger(__name__)

assert sys.byteorder == "little", "the packed bitmask is read as little-endian words"


# JSON as compact as a model writes it: one space after ':' and ',', no free whitespace (a
# model left free to emit whitespace inside JSON can emit nothing else until max_tokens).
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_value(schema: dict[str, Any] | bool) -> str:
    """A Lark expression for one JSON value matching `schema` (`%json {...}`)."""
    body: dict[str, Any] = {} if schema is True else dict(schema) if schema else {"not": {}}
    body["x-guidance"] = {**JSON_STYLE, **body.get("x-guidance", {})}
    return "%json " + json.dumps(body)  # key order kept: properties come out as declared


def json_grammar(schema: dict[str, Any] | bool) -> str:
    """The grammar of a whole output that is one JSON value matching `schema`."""
    return f"start: {json_value(schema)}\n"


class GrammarError(InvalidRequestError):
    """A grammar the backend cannot compile (a 400 naming the field that carried it)."""


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Unpack `bitmask` [rows, words] (int32, CPU) into a bool [rows, vocab_size] tensor."""
    # NOTE: little-endian words: byte b of word w holds tokens 32w + 8b ... 32w + 8b + 7
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, bitorder="little")
    return torch.from_numpy(bits[:, :vocab_size].view(np.bool_))


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set the logits of disallowed tokens to -inf, in place. `logits` [rows, V]."""
    logits.masked_fill_(~allowed_tokens(bitmask, logits.shape[-1]), float("-inf"))


class GrammarState:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: object):
        self._matcher = matcher

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into row `row` of `bitmask`."""
        view = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(view.data_ptr(), view.numel() * 4)  # type: ignore[attr-defined]

    def accept(self, token_id: int) -> bool:
        """Advance by `token_id`; False (and the state is dead) if the grammar forbids it."""
        return bool(self._matcher.consume_token(token_id))  # type: ignore[attr-defined]

    def advance(self, token_ids: list[int]) -> bool:
        """Replay tokens already emitted (a resumed or handed-off sequence)."""
        return all(self.accept(t) for t in token_ids)

    def forced(self, limit: int) -> list[int]:
        """The tokens the grammar allows alone from here (at most `limit`), accepted: a
        sequence appends them without sampling (jump-forward decoding)."""
        if limit <= 0:
            return []
        tokens = list(self._matcher.compute_ff_tokens())[:limit]  # type: ignore[attr-defined]
        if tokens and not self.advance(tokens):
            raise RuntimeError(f"forced tokens break the grammar: {self.error}")
        return tokens

    @property
    def is_complete(self) -> bool:
        """The output so far is a whole sentence of the grammar (it may end here)."""
        return bool(self._matcher.is_accepting())  # type: ignore[attr-defined]

    @property
    def is_done(self) -> bool:
        """The grammar is complete and nothing but end-of-sequence may follow."""
        return bool(self._matcher.is_stopped())  # type: ignore[attr-defined]

    @property
    def error(self) -> str:
        return str(self._matcher.get_error())  # type: ignore[attr-defined]


class GrammarCompiler:
    """Compiles grammars for one tokenizer; an LRU cache of compiled matchers by grammar text.

    Thread-safe: the engine's deployments compile from a worker thread while the engine
    thread builds sequence states from cached entries.
    """

    def __init__(
        self, tokenizer_json: Path, vocab_size: int, eos_token_ids: list[int], capacity: int = 256
    ):
        self.tokenizer_json = Path(tokenizer_json)
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self.capacity = capacity
        self._tokenizer: object | None = None
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.compile_s: list[float] = []  # recent compile times (bounded)

    def _llg_tokenizer(self) -> object:
        if self._tokenizer is None:
            from llguidance import LLTokenizer

            text = self.tokenizer_json.read_text()
            self._tokenizer = LLTokenizer(
                text, n_vocab=self.vocab_size, eos_token=self.eos_token_ids
            )
        return self._tokenizer

    def compile(self, grammar: str) -> object:
        """The compiled matcher for `grammar` (from the cache when seen before).

        Raises:
            GrammarError: the backend rejects the grammar.
        """
        with self._lock:
            matcher = self._cache.get(grammar)
            if matcher is not None:
                self._cache.move_to_end(grammar)
                self.hits += 1
                return matcher
        from llguidance import LLMatcher

        started = time.perf_counter()
        tokenizer = self._llg_tokenizer()
        matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(
                f"cannot compile the grammar: {matcher.get_error()}", code="invalid_grammar"
            )
        elapsed = time.perf_counter() - started
        with self._lock:
            self.misses += 1
            self.compile_s = [*self.compile_s[-255:], elapsed]
            self._cache[grammar] = matcher
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return matcher

    def state(self, grammar: str, emitted: list[int] | None = None) -> GrammarState:
        """A fresh state for one sequence, advanced by the tokens it already `emitted`.

        Raises:
            GrammarError: the grammar does not compile, or `emitted` breaks it.
        """
        state = GrammarState(self.compile(grammar).deep_copy())  # type: ignore[attr-defined]
        if emitted and not state.advance(emitted):
            raise GrammarError(f"the tokens already emitted break the grammar: {state.error}")
        return state
