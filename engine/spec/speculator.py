"""Speculator: one engine's drafter, policy and counters, between its steps."""

from __future__ import annotations

from engine.config import SpeculativeConfig
from engine.sequence import Sequence, SequenceStatus
from engine.spec import Drafter, make_drafter
from engine.spec.policy import Candidate, SpecPolicy, SpecStats


class Speculator:
    """Gives decoding sequences drafts before a step and books the verdicts after it.

    Args:
        max_rows: most query rows a step may reach through drafts while the batch alone
            stays within it (a quantised engine's kernel hand-over: above it matmuls are
            slower and round differently from a plain step of this batch); None: no cap.
    """

    def __init__(self, config: SpeculativeConfig, max_model_len: int, max_rows: int | None):
        self.drafter: Drafter | None = make_drafter(config)
        self.policy = SpecPolicy(config.num_speculative_tokens, config.adaptive)
        self.stats = SpecStats()
        self.max_model_len = max_model_len
        self.max_rows = max_rows

    @property
    def enabled(self) -> bool:
        return self.drafter is not None

    def draft(self, running: list[Sequence], num_waiting: int = 0) -> None:
        """Set `seq.draft` on each decoding sequence the policy says drafting pays for.

        NOTE: not while prompts are being prefilled (`num_waiting` or a prefilling running
        sequence): that step is compute-bound, so drafts cost full price, and its matmuls
        run the dense kernel, whose rounding depends on the row count.
        """
        if self.drafter is None or num_waiting:
            return
        cands: dict[str, Sequence] = {}
        base_rows = 0
        for seq in running:
            if seq.is_prefilling:
                return
            if seq.status is not SequenceStatus.RUNNING:
                continue
            base_rows += 1
            if seq.params.speculative and not seq.prefill_only and self._room(seq) > 0:
                cands[seq.request_id] = seq
        if not cands or self.max_rows is not None and base_rows >= self.max_rows:
            # NOTE: a quantised engine's batch that alone fills the kernel's rows is on the
            # dense kernel, compute-bound: drafts measured 0.89-1.11x at batch 32
            return
        max_rows = self.max_rows
        limits = self.policy.allocate(
            [_candidate(seq, self._room(seq)) for seq in cands.values()], base_rows, max_rows
        )
        if not limits:
            self.stats.declined_steps += 1
            return
        proposed = {}
        for key, n in limits.items():
            seq = cands[key]
            proposed[key] = self.drafter.propose(
                key, seq.root_key, seq.token_ids, seq.num_prompt_tokens, n
            )
        drafted = [_candidate(cands[k], len(d)) for k, d in proposed.items() if d]
        if not drafted:
            return
        # NOTE: the drafters may propose less than allowed: share the rows again among
        # the sequences that have a draft.
        for key, n in self.policy.allocate(drafted, base_rows, max_rows).items():
            cands[key].draft = proposed[key][:n]

    def observe_step(self, rows: int, seconds: float) -> None:
        """A decode-only step of `rows` query rows took `seconds` end to end."""
        if self.drafter is not None:
            self.policy.observe_step(rows, seconds)

    def record(self, seq: Sequence, drafted: int, accepted: int) -> None:
        seq.num_drafted_tokens += drafted
        seq.num_accepted_tokens += accepted
        seq.num_spec_steps += 1
        seq.num_spec_rejections += accepted < drafted
        self.stats.record(drafted, accepted, accepted + 1)
        self.policy.observe_verify(drafted, accepted)

    def finish(self, seq: Sequence) -> None:
        if self.drafter is not None and not seq.prefill_only:
            self.drafter.finish(seq.request_id, seq.root_key, seq.output_token_ids)

    def _room(self, seq: Sequence) -> int:
        """Most tokens `seq` may draft: all accepted plus the sampled one must fit its
        max_tokens and the context."""
        return min(
            seq.params.max_tokens - seq.num_output_tokens - 1,
            self.max_model_len - seq.num_tokens - 1,
        )


def _candidate(seq: Sequence, room: int) -> Candidate:
    return Candidate(seq.request_id, seq.num_accepted_tokens, seq.num_spec_rejections, room)
