"""Continuous batching: decide which tokens of which sequences run in the next step.

Policy only: it moves sequences between queues and asks the BlockManager for slots, then
returns a StepPlan (plain data) that the ModelRunner executes.

NOTE on the algorithm: running sequences go first, in arrival order, each taking as many
tokens as it still needs (1 when decoding, a chunk when prefilling) out of the step's token
budget. When a running sequence needs a new block and the pool is empty, the most recently
admitted running sequence is preempted (its blocks freed, to be recomputed later: its
prefix usually survives in the cache). Waiting sequences are admitted only if nothing was
preempted, while budget, batch slots and blocks (above a small watermark) remain.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # first token position computed in this step
    num_tokens: int

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
        return sum(c.num_tokens for c in self.chunks)

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
    ):
        self.block_manager = block_manager
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
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take `seq` out of whichever queue holds it and release its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.block_table:
            self.block_manager.free(seq)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            end = seq.num_computed_tokens + num_tokens
            while not bm.can_ensure_slots(seq, end):
                victim = self.running[-1]
                self._preempt(victim, plan)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            bm.ensure_slots(seq, end)
            plan.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_tokens))
            budget -= num_tokens

        while (
            not plan.preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.max_num_seqs
        ):
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
            num_tokens = min(seq.num_tokens - seq.num_computed_tokens, budget)
            plan.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_tokens))
            budget -= num_tokens
        return plan

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)
        self.num_preemptions += 1
