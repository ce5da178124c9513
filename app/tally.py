"""Tally: a request's usage and timings, gathered from its choices' outputs as they come;
also what the admission lease bills (`counts`). Choice: one choice's accumulated reply."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from app.admission.queues import Lease
from app.api.schemas import Timings, Usage
from engine.output import RequestOutput
from engine.sequence import TokenLogprob

TIMINGS = {  # Timings field -> RequestOutput.metrics key
    "prefill_ms": "engine_first_output_s",
    "schedule_ms": "schedule_s",
    "kv_read_ms": "kv_read_s",
}


class Tally:
    """Usage and timings of a request's choices, from their outputs as they come."""

    def __init__(self, num_prompt_tokens: int, n: int, lease: Lease | None = None):
        self.num_prompt_tokens = num_prompt_tokens
        self.num_tokens = [0] * n
        self.cached = 0
        self.timings = Timings()
        self.start = time.perf_counter()
        self.first_s: float | None = None  # since start: the first output
        self.last_s = 0.0
        self.lease = lease
        if lease is not None:
            lease.meter = self
            self.timings.queue_ms = lease.queued_s * 1e3

    def note(self, index: int, output: RequestOutput) -> None:
        now = time.perf_counter() - self.start
        if self.first_s is None:
            self.first_s = now
        self.last_s = now
        if self.lease is not None:
            self.lease.prefill_done()  # a first token: the prompt left the prefill queue
        self.num_tokens[index] = output.num_output_tokens
        if output.finished:
            self.cached = max(self.cached, output.num_cached_tokens)
        # the first choice's first output: engine time to the first token on the PE (no
        # hops, no transfer), and the request path's own steps before it
        if output.metrics and self.timings.prefill_ms is None:
            for name, metric in TIMINGS.items():
                seconds = output.metrics.get(metric)
                if seconds is not None:
                    setattr(self.timings, name, seconds * 1e3)

    def usage(self) -> Usage:
        return Usage.of(self.num_prompt_tokens, sum(self.num_tokens), self.cached)

    @property
    def ttft_s(self) -> float | None:
        """From arrival at the ingress (admission wait included) to the first output."""
        if self.first_s is None:
            return None
        return self.first_s + (self.lease.queued_s if self.lease is not None else 0.0)

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (the longest choice's)."""
        tokens = max(self.num_tokens, default=0)
        if self.first_s is None or tokens < 2:
            return None
        return (self.last_s - self.first_s) / (tokens - 1)

    def counts(self) -> tuple[int, int, int]:
        """(hit, miss, output) tokens so far: what the request is billed for."""
        return self.cached, self.num_prompt_tokens - self.cached, sum(self.num_tokens)


@dataclass(slots=True)
class Choice:
    """One choice's accumulated result."""

    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    token_ids: list[int] = field(default_factory=list)
