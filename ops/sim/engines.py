"""Simulated prefill and decode engines: the same queues and reports as the live ones.

    PrefillEngine  FIFO prompts; each step takes running prompts first, then admits waiting
                   ones while the token budget, the compute quota (the paper's 300 ms; the
                   overflowing prompt gets the largest chunk that fits) and KV blocks last,
                   as engine/batch_scheduler.py, predicting chunk times with the engine's
                   own PrefillCostModel fitted online to the simulated steps' durations.
                   A prompt's hit KV is imported when it is admitted: added to the step
                   on a CPU, overlapped with it (layer-wise, over the CNIC) on a GPU. The
                   first token is sampled after the last chunk.
    DecodeEngine   continuous batching: an import waits (FIFO) for blocks and a batch slot,
                   then every step advances every sequence by one token. Steps are not
                   events: the batch progresses as a fluid at 1 token per step time, which
                   is recomputed whenever the batch or its host share changes.

Both publish `LoadReport`s with the fields engine_loop.EngineLoop._measure_load fills in,
and name in `arrived_ids` the requests they took in (from `submit`, when the report starts
counting them) during the last ARRIVED_WINDOW_S, so the Scheduler's view retires the work it
planned for them.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from deployments.protocol import ARRIVED_WINDOW_S, LoadReport, RecentIds, Role
from engine.cost_model import PrefillCostModel, attention_work
from ops.sim.events import EventLoop, Host
from ops.sim.metrics import TurnRecord
from ops.sim.perf import PerfModel

MIN_CHUNK_TOKENS = 16  # engine/batch_scheduler.py: progress whatever the estimate says


class Task(Protocol):
    record: TurnRecord
    blocks: int  # KV blocks it holds while admitted


T = TypeVar("T", bound=Task)


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """What an engine of either role is built with: where it runs and what it holds."""

    loop: EventLoop
    replica_id: str
    node_id: str
    perf: PerfModel
    num_blocks: int  # its KV pool
    host: Host | None  # the CPU cores it shares (CPU devices), None on a GPU
    max_num_seqs: int


class Engine(Generic[T]):
    """What both roles share: identity, the host share, the waiting queue, the KV blocks
    tasks hold while admitted, and reports (dirty flag, arrived ids, the common fields)."""

    role: Role = "prefill"

    def __init__(self, spec: EngineSpec):
        self.loop = spec.loop
        self.replica_id = spec.replica_id
        self.node_id = spec.node_id
        self.perf = spec.perf
        self.block_size = spec.perf.model.block_size
        self.num_blocks = spec.num_blocks
        self.free_blocks = spec.num_blocks
        self.host = spec.host
        self.max_num_seqs = spec.max_num_seqs
        self.share = 1.0
        self.dirty = True  # changed since its last report
        self.busy_s = 0.0
        self.tokens_computed = 0
        self._version = 0
        self.waiting: deque[T] = deque()
        self.arrived = RecentIds(ARRIVED_WINDOW_S)  # ids taken in: the reports' arrived_ids

    def _take_in(self, task: T) -> None:
        """Queue a submitted task; from now on the reports name its request as arrived."""
        self.waiting.append(task)
        self.arrived.note(task.record.request_id, self.loop.now)
        self.dirty = True

    def _admit(self, task: T, num_blocks: int) -> None:
        """Move the head of the queue in, holding `num_blocks` KV blocks until it is done."""
        self.waiting.popleft()
        task.blocks = num_blocks
        self.free_blocks -= num_blocks

    def _set_busy(self, busy: bool) -> None:
        if self.host is not None:
            self.share = self.host.set_busy(self.loop.now, self, busy)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def on_share_change(self, now: float, share: float) -> None:
        raise NotImplementedError

    def _load_report(
        self,
        now: float,
        num_queued_tokens: int,
        num_running: int,
        num_context_tokens: int,
        prefill_tokens_per_s: float = 0.0,
    ) -> LoadReport:
        """The LoadReport with the fields both roles fill in alike, and the given ones."""
        return LoadReport(
            replica_id=self.replica_id,
            role=self.role,
            node_id=self.node_id,
            num_queued_tokens=num_queued_tokens,
            num_running=num_running,
            num_waiting=len(self.waiting),
            num_free_blocks=self.free_blocks,
            num_total_blocks=self.num_blocks,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            timestamp_s=now,
            num_context_tokens=num_context_tokens,
            kv_bytes_per_token=self.perf.model.kv_bytes_per_token,
            prefill_tokens_per_s=prefill_tokens_per_s,
            arrived_ids=self.arrived.within(now),
        )


@dataclass(slots=True)
class PrefillTask:
    record: TurnRecord
    num_tokens: int  # the prompt
    num_computed: int  # hit tokens at first, then each chunk's
    import_s: float  # engine time to import the hit KV (CPU); 0 on a GPU
    load_s: float  # GPU: time to stream the hit KV into HBM over the CNIC, layer by layer
    on_first_token: Callable[[PrefillTask], None]
    blocks: int = 0

    @property
    def remaining(self) -> int:
        return self.num_tokens - self.num_computed


class PrefillEngine(Engine[PrefillTask]):
    role = "prefill"

    def __init__(
        self,
        spec: EngineSpec,
        max_batched_tokens: int,
        quota_s: float | None,
        cost_model: PrefillCostModel | None = None,
    ):
        super().__init__(spec)
        self.cost = cost_model or PrefillCostModel()
        self.max_batched_tokens = max_batched_tokens
        self.quota_s = quota_s
        self.watermark = max(1, spec.num_blocks // 100)
        self.running: list[PrefillTask] = []
        self._step: list[tuple[PrefillTask, int]] = []
        self._work_left = 0.0  # uncontended seconds left in the current step
        self._not_before = 0.0  # GPU: the step cannot end before its hit KV is loaded
        self._last = 0.0
        self._started = 0.0

    def submit(self, task: PrefillTask) -> None:
        self._take_in(task)
        if not self._step:
            self._start_step()

    def _fit(self, task: PrefillTask, want: int, left_s: float, first: bool) -> int:
        if self.quota_s is None or want <= 1:
            return want
        n = self.cost.max_tokens_within(task.num_computed, left_s, want)
        return min(want, MIN_CHUNK_TOKENS) if n == 0 and first else n

    def _predict(self, task: PrefillTask, n: int) -> float:
        return self.cost.predict(task.num_computed, n) if n > 1 else 0.0

    def _start_step(self) -> None:
        budget, left = self.max_batched_tokens, self.quota_s or math.inf
        chunks: list[tuple[PrefillTask, int]] = []
        import_s = load_s = 0.0
        full = False
        for task in self.running:
            if budget <= 0 or left <= 0:
                full = True
                break
            want = min(task.remaining, budget)
            n = self._fit(task, want, left, not chunks)
            if n <= 0:
                full = True
                break
            chunks.append((task, n))
            budget, left = budget - n, left - self._predict(task, n)
            full = full or n < want
        while self.waiting and not full and budget > 0 and left > 0:
            task = self.waiting[0]
            need = self.blocks_for(task.num_tokens)
            room = self.free_blocks - (self.watermark if self.running else 0)
            if len(self.running) >= self.max_num_seqs or (need > room and self.running):
                break
            self._admit(task, need)
            self.running.append(task)
            import_s += task.import_s
            load_s += task.load_s
            want = min(task.remaining, budget)
            n = max(1, self._fit(task, want, left, not chunks))
            chunks.append((task, n))
            budget, left = budget - n, left - self._predict(task, n)
            full = n < want
        if not chunks:
            self._set_busy(False)
            return
        self._step = chunks
        self._work_left = self.perf.prefill_s([(t.num_computed, n) for t, n in chunks]) + import_s
        # NOTE: the loads overlap the compute (layer-wise): a step ends when both are done
        self._not_before = self.loop.now + load_s
        self._last = self._started = self.loop.now
        self._set_busy(True)
        self._schedule_end()

    def _schedule_end(self) -> None:
        self._version += 1
        end = max(self.loop.now + self._work_left / self.share, self._not_before)
        self.loop.at(end, self._end_step, self._version)

    def on_share_change(self, now: float, share: float) -> None:
        if self._step:
            self._work_left = max(0.0, self._work_left - (now - self._last) * self.share)
            self._last = now
        self.share = share
        if self._step:
            self._schedule_end()

    def _end_step(self, version: int) -> None:
        if version != self._version:
            return
        seconds = self.loop.now - self._started
        self.busy_s += seconds
        step, self._step = self._step, []
        big = [(t.num_computed, n) for t, n in step if n > 1]
        num_tokens = sum(n for _, n in step)
        if big and sum(n for _, n in big) * 2 > num_tokens:  # engine/core.py _observe_cost
            work = sum(attention_work(c, n) for c, n in big)
            self.cost.observe(num_tokens, work, seconds)
        self._work_left = 0.0
        done: list[PrefillTask] = []
        for task, n in step:
            task.num_computed += n
            self.tokens_computed += n
            if task.remaining <= 0:
                done.append(task)
        for task in done:
            self.running.remove(task)
            self.free_blocks += task.blocks
        self.dirty = True
        self._start_step()  # before the callbacks: they may submit more work
        for task in done:
            task.on_first_token(task)

    def load_report(self, now: float) -> LoadReport:
        tasks = [*self.waiting, *self.running]
        return self._load_report(
            now,
            num_queued_tokens=sum(t.remaining for t in tasks),
            num_running=len(self.running),
            num_context_tokens=sum(t.num_tokens for t in tasks),
            prefill_tokens_per_s=self.tokens_computed / self.busy_s if self.busy_s > 1 else 0.0,
        )


@dataclass(slots=True)
class DecodeTask:
    record: TurnRecord
    context: int  # tokens whose KV it holds at admission (prompt + the PE's token)
    num_steps: int  # tokens the DE generates
    on_done: Callable[[DecodeTask], None]
    blocks: int = 0
    joined_at: float = 0.0  # the engine's progress counter when it joined
    keys: float = 0.0  # keys it attends per step (min(context, top-k))
    seq: int = field(default=0)


class DecodeEngine(Engine[DecodeTask]):
    role = "decode"

    def __init__(self, spec: EngineSpec):
        super().__init__(spec)
        self.running: dict[int, DecodeTask] = {}
        self._finish: list[tuple[float, int]] = []  # (progress at which it is done, seq)
        self._progress = 0.0  # tokens every running sequence has advanced since start
        self._rate = 0.0  # progress per second
        self._last = 0.0
        self._sum_ctx0 = 0.0  # sum of (context at admission - progress at admission)
        self._sum_keys = 0.0
        self._seq = 0
        self._topk = spec.perf.model.sparse_topk

    def submit(self, task: DecodeTask) -> None:
        self._take_in(task)
        self._advance(self.loop.now)
        self._admit_waiting()
        self._reschedule()

    def _admit_waiting(self) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            task = self.waiting[0]
            need = self.blocks_for(task.context + task.num_steps)
            if need > self.free_blocks and self.running:
                return
            self._admit(task, need)
            task.record.decode_admit_s = self.loop.now
            self._seq += 1
            task.seq, task.joined_at = self._seq, self._progress
            task.keys = min(task.context, self._topk) if self._topk else task.context
            self.running[task.seq] = task
            self._sum_ctx0 += task.context - self._progress
            self._sum_keys += task.keys
            heapq.heappush(self._finish, (self._progress + task.num_steps, task.seq))

    def _advance(self, now: float) -> None:
        if self.running:
            dt = now - self._last
            self._progress += dt * self._rate
            self.busy_s += dt
            self.tokens_computed += int(dt * self._rate * len(self.running))
        self._last = now

    def _reschedule(self) -> None:
        self._version += 1
        n = len(self.running)
        self._set_busy(n > 0)
        if not n:
            self._rate = 0.0
            return
        sum_ctx = self._sum_ctx0 + n * self._progress
        # NOTE: a sequence's keys (min(context, top-k)) are fixed at admission: the paper's
        # contexts are far above top-k, so the few crossing it mid-decode are not tracked.
        sum_keys = sum_ctx if not self._topk else min(self._sum_keys, sum_ctx)
        step_s = self.perf.decode_step_agg_s(n, sum_ctx, sum_keys)
        self._rate = self.share / step_s
        done_at = self._finish[0][0]
        dt = max(0.0, (done_at - self._progress) / self._rate)
        self.loop.at(self.loop.now + dt, self._on_finish, self._version)

    def on_share_change(self, now: float, share: float) -> None:
        self._advance(now)
        self.share = share
        if self.running:
            self._reschedule()

    def _on_finish(self, version: int) -> None:
        if version != self._version:
            return
        self._advance(self.loop.now)
        done: list[DecodeTask] = []
        while self._finish and self._finish[0][0] <= self._progress + 1e-6:
            _, seq = heapq.heappop(self._finish)
            task = self.running.pop(seq)
            self.free_blocks += task.blocks
            self._sum_ctx0 -= task.context - task.joined_at
            self._sum_keys -= task.keys
            done.append(task)
        self.dirty = True
        self._admit_waiting()
        self._reschedule()
        for task in done:
            task.on_done(task)

    def load_report(self, now: float) -> LoadReport:
        waiting_tokens = sum(t.context for t in self.waiting)
        n = len(self.running)
        held = self._sum_ctx0 + n * (self._progress + (now - self._last) * self._rate)
        return self._load_report(
            now,
            num_queued_tokens=waiting_tokens + n,
            num_running=n,
            num_context_tokens=int(held) + waiting_tokens,
        )
