"""The `n` choices of one request run concurrently; `merge_choices` yields their outputs as
(choice index, output) in the order they come."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from engine.output import RequestOutput

Indexed = tuple[int, RequestOutput]


async def merge_choices(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[Indexed]:
    """Every stream's outputs, tagged with the stream's index, as they come. The first error
    of any stream ends the merge (and with it, on close, every other stream)."""
    if len(streams) == 1:  # no tasks: the one choice runs in the caller's task
        async with contextlib.aclosing(streams[0]) as only:  # type: ignore[type-var]
            async for output in only:
                yield 0, output
        return
    queue: asyncio.Queue[Indexed | BaseException | None] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for output in stream:
                await queue.put((index, output))
        except Exception as exc:
            await queue.put(exc)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
