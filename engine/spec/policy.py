"""When to speculate: draft only what the measured step cost and the acceptance pay for.

Decode is memory-bound at small batches, so scoring a few drafted tokens in the same
forward costs little; on a 2-core CPU the spare compute is gone by batch 8-32, and a
drafted token that is rejected is pure cost. Each step this module compares, for the rows
the batch would run anyway and for every extra drafted row, the expected goodput

    (tokens the step emits) / (seconds the step takes)

where a sequence that has accepted a fraction `alpha` of its drafted tokens so far emits
`1 + alpha + alpha^2 + ... + alpha^d` tokens on a draft of `d` (acceptance stops at the
first rejection), and the seconds come from `StepCostTable`: the engine's own decode
steps, timed end to end (forward, verification, bookkeeping) by how many query rows they
ran. The allocation takes the extra rows with the highest expected value first and stops
where goodput peaks; if that is no better than drafting nothing by `margin`, nothing is
drafted (and the drafters are not even asked).

Pure (no torch, no clock): the engine feeds it the rows and seconds of each step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EMA = 0.2  # weight of a new observation of a row count's step time
PRIOR_SLOPE = 0.05  # unmeasured rows: each extra row costs 5 % of a measured step (memory-bound)
PRIOR_DRAFTS = 4.0  # a new sequence's acceptance starts as the engine's, worth 4 drafts
REFRESH_STEPS = 50  # re-measure the no-draft step at least this often while speculating


@dataclass(slots=True)
class SpecStats:
    """Speculation totals of one engine (deltas of these feed the benchmarks and metrics)."""

    drafted_tokens: int = 0
    accepted_tokens: int = 0
    verify_steps: int = 0  # sequence-steps that verified at least one drafted token
    emitted_tokens: int = 0  # tokens those sequence-steps emitted (accepted + 1 each)
    declined_steps: int = 0  # steps whose candidates the policy drafted nothing for

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verifying sequence emitted per step (1 + accepted)."""
        return self.emitted_tokens / self.verify_steps if self.verify_steps else 0.0

    def record(self, drafted: int, accepted: int, emitted: int) -> None:
        self.drafted_tokens += drafted
        self.accepted_tokens += accepted
        self.verify_steps += 1
        self.emitted_tokens += emitted


@dataclass(slots=True)
class StepCostTable:
    """Seconds of a decode step by its number of query rows, from the engine's own steps.

    NOTE: an EMA per exact row count, not a fitted line: the cost is not linear on CPU
    (quantised kernels hand over to dense ones above a row count, attention kernels switch
    with context), and the policy only ever needs the counts it actually runs.
    """

    seconds: dict[int, float] = field(default_factory=dict)
    last_seen: dict[int, int] = field(default_factory=dict)
    steps: int = 0

    def observe(self, rows: int, seconds: float) -> None:
        self.steps += 1
        old = self.seconds.get(rows)
        self.seconds[rows] = seconds if old is None else old + EMA * (seconds - old)
        self.last_seen[rows] = self.steps

    def is_fresh(self, rows: int) -> bool:
        seen = self.last_seen.get(rows)
        return seen is not None and self.steps - seen < REFRESH_STEPS

    def predict(self, rows: int) -> float:
        """Measured seconds at `rows`, else interpolated between the nearest measured
        counts, else extrapolated from the largest (by the measured slope, never below
        the memory-bound prior)."""
        known = self.seconds
        if rows in known:
            return known[rows]
        below = [r for r in known if r < rows]
        above = [r for r in known if r > rows]
        if below and above:
            r1, r2 = max(below), min(above)
            t1, t2 = known[r1], known[r2]
            return t1 + (t2 - t1) * (rows - r1) / (r2 - r1)
        if above:
            return known[min(above)]
        r1 = max(below)
        slope = PRIOR_SLOPE * known[r1]
        lower = [r for r in below if r < r1]
        if lower:
            r0 = max(lower)
            slope = max(slope, (known[r1] - known[r0]) / (r1 - r0))
        return known[r1] + slope * (rows - r1)


@dataclass(slots=True)
class Candidate:
    """A decoding sequence that may draft: its acceptance so far and its room."""

    key: str
    accepted: int  # its drafted tokens accepted so far
    rejected: int  # its verify steps that ended on a rejection
    room: int  # most tokens it may draft this step


class SpecPolicy:
    def __init__(self, max_tokens: int, adaptive: bool = True, margin: float = 0.02):
        self.max_tokens = max_tokens
        self.adaptive = adaptive
        self.margin = margin
        self.costs = StepCostTable()
        self.accepted = 0  # engine-wide, for a new sequence's prior
        self.rejected = 0

    def observe_step(self, rows: int, seconds: float) -> None:
        self.costs.observe(rows, seconds)

    def observe_verify(self, drafted: int, accepted: int) -> None:
        self.accepted += accepted
        self.rejected += accepted < drafted

    def alpha(self, cand: Candidate) -> float:
        """Per-token acceptance of `cand` (geometric model), shrunk towards the engine's."""
        prior = (self.accepted + 1) / (self.accepted + self.rejected + 2)
        num = cand.accepted + PRIOR_DRAFTS * prior
        return num / (cand.accepted + cand.rejected + PRIOR_DRAFTS)

    def allocate(
        self, cands: list[Candidate], base_rows: int, max_rows: int | None = None
    ) -> dict[str, int]:
        """Draft lengths per candidate key (absent: none) for a step of `base_rows` rows.

        `max_rows` caps the step's rows (e.g. where a quantised kernel hands over)."""
        room = {c.key: min(c.room, self.max_tokens) for c in cands if c.room > 0}
        if max_rows is not None:
            spare = max(0, max_rows - base_rows)
            if sum(room.values()) > spare:
                room = _share(room, spare)
        if not self.adaptive:
            return {k: n for k, n in room.items() if n > 0}
        if not self.costs.is_fresh(base_rows):
            return {}  # measure the plain step first (and now and then again)
        gains: list[tuple[float, str]] = []
        for cand in cands:
            a = self.alpha(cand)
            gains.extend((a**i, cand.key) for i in range(1, room.get(cand.key, 0) + 1))
        gains.sort(reverse=True)
        base_rate = base_rows / self.costs.predict(base_rows)
        best_rate, best_m, tokens = base_rate * (1 + self.margin), 0, float(base_rows)
        for m, (gain, _) in enumerate(gains, start=1):
            tokens += gain
            rate = tokens / self.costs.predict(base_rows + m)
            if rate > best_rate:
                best_rate, best_m = rate, m
        out: dict[str, int] = {}
        for _, key in gains[:best_m]:
            out[key] = out.get(key, 0) + 1
        return out


def _share(room: dict[str, int], spare: int) -> dict[str, int]:
    """Split `spare` rows round-robin over the candidates, none beyond its room."""
    out = dict.fromkeys(room, 0)
    while spare > 0:
        progressed = False
        for key, limit in room.items():
            if spare and out[key] < limit:
                out[key] += 1
                spare -= 1
                progressed = True
        if not progressed:
            break
    return {k: n for k, n in out.items() if n > 0}
