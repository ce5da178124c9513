"""RequestMeter: what one request used and how long it took, gathered from its choices'
outputs as they come. The response reports it, the Gate bills and audits it, the outcome
metrics observe it. Choice: one choice's accumulated reply."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from app.api.replies import Timings, Usage
from engine.output import RequestOutput
from engine.sequence import TokenLogprob


class RequestMeter:
    """Usage and timings of a request's choices, from their outputs as they come."""

    def __init__(
        self, num_prompt_tokens: int, n: int, clock: Callable[[], float] = time.perf_counter
    ):
        self.num_prompt_tokens = num_prompt_tokens
        self.num_tokens = [0] * n
        self.cached = 0
        self.timings = Timings()
        self.clock = clock
        self.start = clock()
        self.queued_s = 0.0  # the admission wait before `start`
        self.first_s: float | None = None  # since start: the first output
        self.last_s = 0.0
        # speculative decoding per choice: (drafted, accepted, verify steps), with what an
        # engine the choice left (a moved decode restarts its counters) carried in `_spec_base`
        self.spec = [(0, 0, 0)] * n
        self._spec_base = [(0, 0, 0)] * n

    def admitted(self, queued_s: float) -> None:
        """The request waited `queued_s` in admission; it starts now."""
        self.start = self.clock()
        self.queued_s = queued_s
        self.timings.queue_ms = queued_s * 1e3

    def note(self, index: int, output: RequestOutput) -> None:
        now = self.clock() - self.start
        if self.first_s is None:
            self.first_s = now
        self.last_s = now
        self.num_tokens[index] = output.num_output_tokens
        counts = (output.num_drafted_tokens, output.num_accepted_tokens, output.num_spec_steps)
        if counts < self.spec[index]:  # a fresh engine took the choice over
            self._spec_base[index] = self.totals(index)
            self.spec[index] = (0, 0, 0)
        self.spec[index] = max(self.spec[index], counts)
        if output.finished:
            self.cached = max(self.cached, output.num_cached_tokens)
        # the first choice's first output: engine time to the first token on the PE (no
        # hops, no transfer), and the request path's own steps before it
        first = output.timings
        if first is not None and self.timings.prefill_ms is None:
            for name, seconds in (
                ("prefill_ms", first.engine_s),
                ("schedule_ms", first.schedule_s),
                ("kv_read_ms", first.kv_read_s),
            ):
                if seconds is not None:
                    setattr(self.timings, name, seconds * 1e3)

    def totals(self, index: int) -> tuple[int, int, int]:
        """Choice `index`'s speculation so far: (drafted, accepted, verify steps)."""
        base, now = self._spec_base[index], self.spec[index]
        return (base[0] + now[0], base[1] + now[1], base[2] + now[2])

    def spec_counts(self) -> tuple[int, int, int]:
        """The request's speculation, all choices: (drafted, accepted, verify steps)."""
        per_choice = [self.totals(i) for i in range(len(self.spec))]
        return tuple(sum(c[k] for c in per_choice) for k in range(3))  # type: ignore[return-value]

    def usage(self) -> Usage:
        return Usage.of(self.num_prompt_tokens, sum(self.num_tokens), self.cached)

    @property
    def ttft_s(self) -> float | None:
        """From arrival at the ingress (admission wait included) to the first output."""
        if self.first_s is None:
            return None
        return self.first_s + self.queued_s

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

    def add(self, output: RequestOutput) -> None:
        self.text += output.new_text
        self.token_ids += output.new_token_ids
        if self.logprobs is not None:
            self.logprobs.extend(output.new_logprobs)
        if output.finished:
            self.finish_reason = output.finish_reason
