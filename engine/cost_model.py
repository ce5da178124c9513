"""PrefillCostModel: predicted wall-clock time of a prefill chunk, fitted online.

A chunk of `n` new tokens after `c` tokens whose KV is already available (a storage hit,
the prefix cache, or earlier chunks) costs about

    t(c, n) = a·n + b·n·(c + n/2)

— the linear term is the projections/MLP (FLOPs ∝ n), the second the attention (each of
the n queries reads c + its own position keys: FLOPs ∝ n·(c + n/2)). The DualPath paper's
PE batch formation estimates attention FLOPs from (cached, bsz) pairs and converts them to
time with a profiled fit; this does the same with an exponentially weighted least-squares
fit of (a, b) over the engine's own steps, starting from configured priors.

Pure (no torch, no clock): the engine feeds it (tokens, work, seconds) of each step.
"""

from __future__ import annotations

from dataclasses import dataclass


def attention_work(num_cached: int, num_new: int) -> float:
    """Query-key pairs of a causal chunk: n·(c + (n+1)/2)."""
    return num_new * (num_cached + (num_new + 1) / 2)


@dataclass(slots=True)
class PrefillCostModel:
    per_token_s: float = 5e-4  # a: CPU prior for a ~100M-parameter model, one thread
    per_pair_s: float = 5e-8  # b: attention cost per query-key pair
    decay: float = 0.95  # weight of the past in the running fit
    # running sums of the weighted normal equations for (a, b)
    _snn: float = 0.0
    _snw: float = 0.0
    _sww: float = 0.0
    _snt: float = 0.0
    _swt: float = 0.0

    def predict(self, num_cached: int, num_new: int) -> float:
        return self.per_token_s * num_new + self.per_pair_s * attention_work(num_cached, num_new)

    def observe(self, num_tokens: int, work: float, seconds: float) -> None:
        """Fold in one step that computed `num_tokens` tokens and `work` query-key pairs."""
        if num_tokens <= 0 or seconds <= 0:
            return
        d = self.decay
        self._snn = d * self._snn + num_tokens * num_tokens
        self._snw = d * self._snw + num_tokens * work
        self._sww = d * self._sww + work * work
        self._snt = d * self._snt + num_tokens * seconds
        self._swt = d * self._swt + work * seconds
        det = self._snn * self._sww - self._snw * self._snw
        if det <= 1e-9 * self._snn * self._sww:
            # NOTE: one kind of step only (e.g. same-size chunks): scale the prior to fit.
            predicted = self.per_token_s * self._snn + self.per_pair_s * self._snw
            if predicted > 0:
                scale = self._snt / predicted
                self.per_token_s *= scale
                self.per_pair_s *= scale
            return
        a = (self._snt * self._sww - self._swt * self._snw) / det
        b = (self._swt * self._snn - self._snt * self._snw) / det
        if a > 0 and b >= 0:
            self.per_token_s, self.per_pair_s = a, b

    def max_tokens_within(self, num_cached: int, budget_s: float, limit: int) -> int:
        """The largest n ≤ limit with predict(num_cached, n) ≤ budget_s (binary search)."""
        lo, hi = 0, limit
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.predict(num_cached, mid) <= budget_s * (1 + 1e-9):  # float slack
                lo = mid
            else:
                hi = mid - 1
        return lo
