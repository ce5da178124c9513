"""Small builders shared by unit tests."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable

from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from kvstore.keys import root_key

GREEDY = SamplingParams(temperature=0, max_tokens=24)


def make_seq(token_ids: list[int], rid: str = "r", salt: bytes = b"", **params) -> Sequence:
    return Sequence(
        request_id=rid,
        token_ids=list(token_ids),
        params=SamplingParams(**params),
        root_key=root_key("toy-model", salt),
    )


def chat(engine, text: str, system: str | None = None) -> list[int]:
    messages = [{"role": "system", "content": system}] if system else []
    return engine.tokenizer.encode_chat([*messages, {"role": "user", "content": text}])


def wait_until(
    predicate: Callable[[], object], what: str, timeout_s: float = 10.0, interval_s: float = 0.02
) -> None:
    """Poll `predicate` until it is truthy: the wait for an asynchronous effect (a thread, a
    process, a report), never a fixed sleep that is too short on a loaded machine.

    Raises:
        AssertionError: `what` did not happen within `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting until {what}")
        time.sleep(interval_s)


async def wait_for(
    predicate: Callable[[], object], what: str, timeout_s: float = 10.0, interval_s: float = 0.005
) -> None:
    """`wait_until` on an event loop: polls between turns of the loop, so the tasks whose
    effect `predicate` checks keep running. `predicate` may be a coroutine function.

    Raises:
        AssertionError: `what` did not happen within `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while not await _truth(predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting until {what}")
        await asyncio.sleep(interval_s)


async def _truth(value: object) -> bool:
    return bool(await value if inspect.isawaitable(value) else value)
