"""EngineLoop: one EngineCore stepping on its own thread, fed by asyncio callers.

The engine is not thread-safe, so every mutation (add, abort) is a command executed on the
engine thread between steps; outputs go back to each request's `OutputStream` on the
caller's event loop. A command may wait for capacity (`ready`), in arrival order: the
decode side uses this to hold KV imports until blocks and batch slots are free.

Used by the prefill and decode shells alike; no Ray here, so unit tests drive it directly.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry.context import Context

from deployments import tracing
from deployments.protocol import RecentIds
from engine.core import EngineCore
from engine.output import FirstTokenTimings, RequestOutput
from engine.sampling_params import SamplingParams
from engine.sequence import SequenceStatus

logger = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5  # how long an idle engine thread blocks waiting for a command


class RequestAborted(RuntimeError):
    """The request was aborted while someone was still reading its stream."""


class OutputStream:
    """Outputs of one request, in order; iterate it once. Leaving early aborts the request."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, owner: EngineLoop):
        self.request_id = request_id
        self._loop = loop
        self._owner = owner
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False

    def put_threadsafe(self, item: RequestOutput | BaseException) -> None:
        if self._loop.is_closed():  # its reader's event loop is gone: nobody to tell
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # closed between the check and the call
            logger.debug("output for %s dropped: event loop closed", self.request_id)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                if item.finished or item.kv is not None:  # done here (or handed off)
                    self.finished = True
                yield item
                if self.finished:
                    return
        finally:
            if not self.finished:  # consumer gone (client disconnect, cancellation)
                self._owner.abort(self.request_id)


@dataclass(slots=True)
class _Admission:
    request_id: str
    add: Callable[[EngineCore], None]
    ready: Callable[[EngineCore], bool] | None
    stream: OutputStream
    num_tokens: int
    trace: Context | None = None  # the caller's span: engine spans go under it
    submitted_ns: int = 0


class EngineLoop:
    def __init__(
        self,
        engine: EngineCore,
        name: str = "engine",
        on_step: Callable[[EngineCore], None] | None = None,
    ):
        self.engine = engine
        self.on_step = on_step  # runs on the engine thread after every step
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._waiting: deque[_Admission] = deque()
        self._streams: dict[str, OutputStream] = {}
        self._admitted_at: dict[str, float] = {}  # until the request's first output
        self._traces: dict[str, Context] = {}  # traced requests in the engine
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.num_steps = 0
        self.busy_s = 0.0  # time spent in steps
        self.tokens_computed = 0  # tokens those steps computed (prefill chunks + decodes)
        self._arrived = RecentIds()  # requests taken in: the reports' arrived_ids
        self.load: dict[str, Any] = self._measure_load()

    # ------------------------------------------------------------------ caller side
    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        self._commands.put(lambda: None)
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def submit(
        self,
        request_id: str,
        add: Callable[[EngineCore], None],
        ready: Callable[[EngineCore], bool] | None = None,
        num_tokens: int = 0,
        trace: Context | None = None,
    ) -> OutputStream:
        """Queue `add(engine)` for the engine thread; returns the request's output stream.

        `add` errors (InvalidRequestError, ...) come out of the stream. With `ready`, the add
        waits (in arrival order) until `ready(engine)` holds. With `trace`, the wait is an
        `engine.queue` span under it and every multi-token chunk an `engine.chunk` span.
        """
        stream = OutputStream(request_id, asyncio.get_running_loop(), self)
        admission = _Admission(request_id, add, ready, stream, num_tokens, trace, time.time_ns())
        self._commands.put(lambda: self._enqueue(admission))
        return stream

    async def compile_grammar(self, params: SamplingParams) -> None:
        """Compile the request's grammar (if any) on a worker thread, cached by the engine:
        its add then finds it ready and never stalls the batch compiling. Raises
        GrammarError (a bad request) for a grammar that does not compile."""
        if params.grammar is not None:
            await asyncio.to_thread(self.engine.grammars.compile, params.grammar)

    def abort(self, request_id: str) -> None:
        self._commands.put(lambda: self._abort(request_id))

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        while not self._stop.is_set():
            busy = self.engine.has_unfinished() or bool(self._waiting)
            self._drain_commands(block=not busy)
            self._admit_waiting()
            if self.engine.has_unfinished():
                self._step()
            self.load = self._measure_load()
        for request_id in list(self._streams):
            self.engine.abort(request_id)

    def _drain_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=IDLE_WAIT_S) if block else None
            while True:
                if command is not None:
                    command()
                command = self._commands.get_nowait()
        except queue.Empty:
            pass

    def _enqueue(self, admission: _Admission) -> None:
        self._streams[admission.request_id] = admission.stream
        self._waiting.append(admission)
        self._arrived.note(admission.request_id, time.time())

    def _admit_waiting(self) -> None:
        while self._waiting:
            admission = self._waiting[0]
            blocked = admission.ready is not None and not admission.ready(self.engine)
            if blocked and self.engine.has_unfinished():
                return  # wait for running requests to free capacity
            # NOTE: blocked with nothing running: nothing will free capacity, so admit it and
            # let the engine reject it (the caller gets the error) instead of waiting forever.
            self._waiting.popleft()
            try:
                admission.add(self.engine)
                self._admitted_at[admission.request_id] = time.perf_counter()
                if admission.trace is not None:
                    self._traces[admission.request_id] = admission.trace
                    tracing.record_span(
                        "engine.queue", admission.trace, admission.submitted_ns, time.time_ns()
                    )
            except Exception as exc:  # bad request or KV: the caller gets the error
                self._streams.pop(admission.request_id, None)
                admission.stream.put_threadsafe(exc)

    def _step(self) -> None:
        started = time.perf_counter()
        started_ns = time.time_ns()
        before = self.engine.num_computed_total
        try:
            outputs = self.engine.step()
            if self.on_step is not None:
                self.on_step(self.engine)
        except Exception as exc:  # engine bug: fail what is running, keep the loop alive
            logger.exception("engine step raised")
            # NOTE: outputs made before the raise are lost, so fail every admitted stream
            # (some requests may already have left engine.seqs), not only those still running.
            waiting = {a.request_id for a in self._waiting}
            for request_id in list(self.engine.seqs):
                self.engine.abort(request_id)
            for request_id in [r for r in self._streams if r not in waiting]:
                self._streams.pop(request_id).put_threadsafe(exc)
                self._admitted_at.pop(request_id, None)
                self._traces.pop(request_id, None)
            return
        self.num_steps += 1
        now = time.perf_counter()
        self.busy_s += now - started
        self.tokens_computed += self.engine.num_computed_total - before
        if self._traces:
            self._trace_chunks(started_ns, time.time_ns())
        for output in outputs:
            admitted = self._admitted_at.pop(output.request_id, None)
            if admitted is not None:  # engine time to the first output (no client-side hops)
                output.timings = FirstTokenTimings(engine_s=now - admitted)
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue
            if output.finished or output.kv is not None:
                del self._streams[output.request_id]
                self._traces.pop(output.request_id, None)
            stream.put_threadsafe(output)

    def _trace_chunks(self, start_ns: int, end_ns: int) -> None:
        """One `engine.chunk` span per traced multi-token chunk of the step just run (decode
        steps of one token each are left out: a long reply would be thousands of spans)."""
        plan = self.engine.last_plan
        if plan is None:
            return
        for chunk in plan.chunks:
            parent = self._traces.get(chunk.seq.request_id)
            if parent is not None and chunk.num_tokens > 1:
                tracing.record_span(
                    "engine.chunk",
                    parent,
                    start_ns,
                    end_ns,
                    start=chunk.start,
                    tokens=chunk.num_tokens,
                    batch_tokens=plan.num_batched_tokens,
                    batch_seqs=len(plan.chunks),
                )

    def _abort(self, request_id: str) -> None:
        self._admitted_at.pop(request_id, None)
        self._traces.pop(request_id, None)
        stream = self._streams.pop(request_id, None)
        if stream is not None:  # harmless when the reader is the one who left
            stream.put_threadsafe(RequestAborted(f"request {request_id} was aborted"))
        for admission in self._waiting:
            if admission.request_id == request_id:
                self._waiting.remove(admission)
                return
        self.engine.abort(request_id)

    def _measure_load(self) -> dict[str, Any]:
        """The engine's load as the next LoadReport carries it. `arrived_ids` are the requests
        taken in recently: each is counted in these figures (or finished already)."""
        engine = self.engine
        sched = engine.scheduler
        queued = sum(a.num_tokens for a in self._waiting)
        for seq in (*sched.waiting, *sched.running):
            if seq.status is not SequenceStatus.FINISHED:
                queued += seq.num_tokens - seq.num_computed_tokens
        context = sum(seq.num_tokens for seq in (*sched.waiting, *sched.running))
        return {
            "num_context_tokens": context + sum(a.num_tokens for a in self._waiting),
            "num_queued_tokens": queued,
            "num_running": len(sched.running),
            "num_waiting": len(sched.waiting) + len(self._waiting),
            "num_free_blocks": engine.block_manager.num_free_blocks,
            "num_total_blocks": engine.block_manager.num_blocks,
            "arrived_ids": self._arrived.within(time.time()),
        }
