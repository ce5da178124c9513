"""Continuous batching: decide which tokens of which sequences run in the next step.

Policy only: it moves sequences between queues and asks the BlockManager for slots, then
returns a StepPlan (plain data) that the ModelRunner executes.

NOTE on the algorithm: running sequences go first, in arrival order, each taking as many
tokens as it still needs (1 when decoding, a chunk when prefilling) out of the step's token
budget. When a running sequence needs a new block and the pool is empty, the most recently
admitted running sequence is preempted (its blocks freed, to be recomputed later: its
prefix usually survives in the cache). Waiting sequences are admitted only if nothing was
preempted, while budget, batch slots and blocks (above a small watermark) remain.

With a compute quota (prefill engines; the DualPath paper's PE batch formation), prefill
chunks also stop at the quota's predicted time: FIFO while the PrefillCostModel's estimate
of the step stays within it; the request that would overflow gets the largest chunk that
fits (binary search) and ends the batch. Every step still computes at least one chunk.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.cost_model import PrefillCostModel
from engine.sequence import Sequence, SequenceStatus

MIN_CHUNK_TOKENS = 16


@dataclass(slots=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # first token position computed in this step
    num_tokens: int
    # speculative tokens after the sequence's last token (decode chunks only), computed in
    # the same forward and kept only as far as the target model agrees (engine/spec)
    draft: list[int] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the sequence, so a token is sampled."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass(slots=True)
class StepPlan:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens + len(c.draft) for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class BatchScheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        watermark_blocks: int | None = None,
        compute_quota_s: float | None = None,
        cost_model: PrefillCostModel | None = None,
    ):
        self.block_manager = block_manager
        self.compute_quota_s = compute_quota_s
        self.cost_model = cost_model or PrefillCostModel()
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.watermark_blocks = (
            max(1, block_manager.num_blocks // 100)
            if watermark_blocks is None
            else watermark_blocks
        )
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        """Queue behind every waiting request of the same or a more urgent priority."""
        seq.status = SequenceStatus.WAITING
        at = len(self.waiting)
        while at and self.waiting[at - 1].priority > seq.priority:
            at -= 1
        self.waiting.insert(at, seq)

    def remove(self, seq: Sequence) -> None:
        """Take `seq` out of whichever queue holds it and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.block_table:
            self.block_manager.free(seq)

    def _fit(self, seq: Sequence, num_tokens: int, plan: StepPlan) -> int:
        """`num_tokens` cut to what the compute quota has left (prefill chunks only)."""
        if self.compute_quota_s is None or num_tokens <= 1:
            return num_tokens
        left = self._quota_left(plan)
        fit = self.cost_model.max_tokens_within(seq.num_computed_tokens, left, num_tokens)
        if fit == 0 and not plan.chunks:
            fit = min(num_tokens, MIN_CHUNK_TOKENS)  # progress, whatever the estimate says
        return fit

    def _fit_draft(self, seq: Sequence, num_tokens: int, budget: int) -> list[int]:
        """`seq.draft` cut to the step's budget and the free blocks; never a preemption.

        NOTE: drafts ride on decode chunks only, and only while slots for them are free:
        speculation is an optimisation, so it never preempts a sequence (like any growth,
        it may take a free block that still caches a prefix).
        """
        if not seq.draft or num_tokens != 1 or seq.is_prefilling:
            return []
        draft = seq.draft[: budget - num_tokens]
        end = seq.num_computed_tokens + num_tokens
        while draft and not self.block_manager.can_ensure_slots(seq, end + len(draft)):
            draft = draft[: len(draft) // 2]
        if draft:
            self.block_manager.ensure_slots(seq, end + len(draft))
        return draft

    def _quota_left(self, plan: StepPlan) -> float:
        if self.compute_quota_s is None:
            return float("inf")
        cost = self.cost_model
        used = sum(cost.predict(c.start, c.num_tokens) for c in plan.chunks if c.num_tokens > 1)
        return self.compute_quota_s - used

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        bm = self.block_manager
        quota_full = False

        # NOTE: a more urgent waiting request goes before the rest of a less urgent prompt:
        # that prompt's remaining chunks wait (its blocks stay), decodes never do.
        urgent = self.waiting[0].priority if self.waiting else None
        for seq in sorted(self.running, key=lambda s: s.priority):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            if urgent is not None and urgent < seq.priority and seq.is_prefilling:
                continue
            num_tokens = self._fit(seq, min(seq.num_tokens - seq.num_computed_tokens, budget), plan)
            if num_tokens == 0:
                quota_full = True
                continue
            end = seq.num_computed_tokens + num_tokens
            while not bm.can_ensure_slots(seq, end):
                victim = self.running[-1]
                self._preempt(victim, plan)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            bm.ensure_slots(seq, end)
            if num_tokens < seq.num_tokens - seq.num_computed_tokens and num_tokens > 1:
                quota_full = quota_full or self.compute_quota_s is not None
            draft = self._fit_draft(seq, num_tokens, budget)
            plan.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_tokens, draft))
            budget -= num_tokens + len(draft)

        while (
            not plan.preempted
            and not quota_full
            and self.waiting
            and budget > 0
            and len(self.running) < self.max_num_seqs
        ):
            if self._quota_left(plan) <= 0:
                break
            seq = self.waiting[0]
            # NOTE: the watermark keeps room for running decodes; with nothing running it
            # would only make a request that fits the pool wait forever.
            watermark = self.watermark_blocks if self.running else 0
            if not bm.can_allocate(seq, watermark):
                break
            self.waiting.popleft()
            bm.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            wanted = min(seq.num_tokens - seq.num_computed_tokens, budget)
            # NOTE: admitted before sizing (its cached prefix is known only now); a quota
            # already spent still gives it one token-sized chunk so it is not stranded.
            num_tokens = max(1, self._fit(seq, wanted, plan))
            plan.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_tokens))
            budget -= num_tokens
            if num_tokens < wanted:
                quota_full = True
        return plan

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)
        self.num_preemptions += 1
