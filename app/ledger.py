"""The per-tenant usage ledger: one `UsageRecord` per billed request, and usage buckets.

Records append to a JSON-lines file (one flushed line each) and are replayed from it on start;
a torn or garbage line is skipped with a warning. `Ledger.buckets` aggregates them the way
OpenAI's usage API does: time buckets aligned to multiples of `bucket_s` since the epoch,
results grouped by (tenant, model, service_tier, window).

Memory is bounded by time, not by traffic: records of the last `exact_s` (a day) are held as
they are; older ones are folded into per-minute sums per (tenant, model, service_tier,
window, currency), so a range reaching further back counts whole minutes there (a minute
counts when its start lies in the range; the usage API's buckets are minute-aligned, so
their sums are exact). The file keeps every line and is never compacted.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import pathlib
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import IO

logger = logging.getLogger(__name__)

MAX_BUCKETS = 1000
BUCKET_WIDTHS = {"1m": 60, "1h": 3600, "1d": 86400}  # the usage API's bucket_width values


@dataclass(frozen=True, slots=True)
class UsageRecord:
    time: float  # unix seconds when billed
    request_id: str
    tenant: str
    model: str
    service_tier: str  # "priority" | "default" | "flex"
    window: str  # pricing.WindowName
    status: str  # "ok" | "error" | "cancelled"
    input_cache_hit_tokens: int
    input_cache_miss_tokens: int
    output_tokens: int
    cost: float
    currency: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> UsageRecord:
        """Parse one line; ValueError unless every field is present with its type (extra keys
        are ignored, so an older reader accepts a newer ledger)."""
        data = json.loads(line)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        for name, kind in _FIELD_TYPES.items():
            if name not in data:
                raise ValueError(f"missing field {name!r}")
            if not isinstance(data[name], kind) or isinstance(data[name], bool):
                raise ValueError(f"field {name!r}: {data[name]!r} is not {kind}")
        return cls(**{name: data[name] for name in _FIELD_TYPES})


_KINDS: dict[str, type | tuple[type, ...]] = {"str": str, "int": int, "float": (int, float)}
_FIELD_TYPES = {f.name: _KINDS[str(f.type)] for f in fields(UsageRecord)}


def _time(rec: UsageRecord) -> float:
    return rec.time


def _empty_result(rec: UsageRecord) -> dict:
    return {
        "object": "usage.result",
        "tenant": rec.tenant,
        "model": rec.model,
        "service_tier": rec.service_tier,
        "window": rec.window,
        "num_model_requests": 0,
        "input_tokens": 0,
        "input_cached_tokens": 0,
        "output_tokens": 0,
        "cost": 0.0,
        "currency": rec.currency,
    }


Group = tuple[str, str, str, str, str]  # tenant, model, service_tier, window, currency


@dataclass(slots=True)
class _MinuteSum:
    """One minute of one group's records, folded: what `buckets` adds up."""

    sample: UsageRecord  # any record of the group (its labels)
    requests: int = 0
    hit_tokens: int = 0
    miss_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0

    def add(self, rec: UsageRecord) -> None:
        self.requests += 1
        self.hit_tokens += rec.input_cache_hit_tokens
        self.miss_tokens += rec.input_cache_miss_tokens
        self.output_tokens += rec.output_tokens
        self.cost += rec.cost


def _group(rec: UsageRecord) -> Group:
    return (rec.tenant, rec.model, rec.service_tier, rec.window, rec.currency)


class Ledger:
    """Usage records in memory (recent ones as they are, older ones folded per minute),
    mirrored to `path` when given. Thread-safe."""

    def __init__(
        self,
        path: pathlib.Path | None = None,
        exact_s: float = 86400.0,
        clock: Callable[[], float] = time.time,
    ):
        self.path = path
        self.exact_s = exact_s
        self.clock = clock
        self._lock = threading.Lock()
        self._records: list[UsageRecord] = []  # since the fold horizon, sorted by time
        self._minutes: dict[int, dict[Group, _MinuteSum]] = {}  # minute -> group -> sums
        self._file: IO[str] | None = None
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        torn = False
        if path.exists():
            data = path.read_bytes()
            self._records = sorted(self._replay(data), key=_time)
            self._fold_locked()
            torn = bool(data) and not data.endswith(b"\n")
        self._file = path.open("a", encoding="utf-8")
        if torn:  # end the torn line, or the next record would be glued onto it
            self._file.write("\n")
            self._file.flush()

    def _replay(self, data: bytes) -> list[UsageRecord]:
        records = []
        for lineno, raw in enumerate(data.split(b"\n"), 1):
            if not raw.strip():
                continue
            try:
                records.append(UsageRecord.from_json(raw.decode("utf-8")))
            except (ValueError, TypeError) as e:
                logger.warning("ledger %s line %d skipped (%s): %.80r", self.path, lineno, e, raw)
        return records

    def record(self, rec: UsageRecord) -> None:
        line = rec.to_json() + "\n"
        with self._lock:
            if self._file is not None:
                self._file.write(line)
                self._file.flush()
            bisect.insort(self._records, rec, key=_time)
            if self._records[0].time < self.clock() - self.exact_s - 60:
                self._fold_locked()

    def records(self, start: float, end: float) -> list[UsageRecord]:
        """Records still held as they are (the last `exact_s`) with start <= time < end,
        oldest first."""
        with self._lock:
            lo = bisect.bisect_left(self._records, start, key=_time)
            hi = bisect.bisect_left(self._records, end, key=_time)
            return self._records[lo:hi]

    def _fold_locked(self) -> None:
        """Fold records older than `exact_s` into their minute's sums."""
        horizon = 60 * math.floor((self.clock() - self.exact_s) / 60)  # a minute boundary
        n = bisect.bisect_left(self._records, horizon, key=_time)
        for rec in self._records[:n]:
            minute = self._minutes.setdefault(math.floor(rec.time / 60), {})
            group = _group(rec)
            (minute.get(group) or minute.setdefault(group, _MinuteSum(rec))).add(rec)
        del self._records[:n]

    def _sums(self, start: float, end: float, tenant: str | None) -> list[tuple[float, _MinuteSum]]:
        """(time, sums) for every record or folded minute in [start, end)."""
        out: list[tuple[float, _MinuteSum]] = []
        with self._lock:
            for minute in sorted(self._minutes):
                if start <= minute * 60 < end:
                    out += [(minute * 60.0, m) for m in self._minutes[minute].values()]
        for rec in self.records(start, end):
            one = _MinuteSum(rec)
            one.add(rec)
            out.append((rec.time, one))
        return [(t, m) for t, m in out if tenant is None or m.sample.tenant == tenant]

    def buckets(
        self, start: float, end: float, bucket_s: int = 86400, tenant: str | None = None
    ) -> list[dict]:
        """Every `bucket_s`-aligned bucket overlapping [start, end), empty ones included, each
        with its results grouped by (tenant, model, service_tier, window) and sorted by them.
        Every record counts, whatever its status. ValueError beyond MAX_BUCKETS buckets."""
        if bucket_s < 1:
            raise ValueError(f"bucket_s must be >= 1, got {bucket_s}")
        if end <= start:
            return []
        first, stop = math.floor(start / bucket_s), math.ceil(end / bucket_s)
        if stop - first > MAX_BUCKETS:
            raise ValueError(
                f"{stop - first} buckets of {bucket_s}s in range; at most {MAX_BUCKETS}"
            )
        groups: list[dict[tuple[str, ...], dict]] = [{} for _ in range(stop - first)]
        for when, sums in self._sums(start, end, tenant):
            # currency is part of the key so a price-currency change never sums two currencies
            key = _group(sums.sample)
            bucket = groups[math.floor(when / bucket_s) - first]
            group = bucket.get(key) or bucket.setdefault(key, _empty_result(sums.sample))
            group["num_model_requests"] += sums.requests
            group["input_tokens"] += sums.hit_tokens + sums.miss_tokens
            group["input_cached_tokens"] += sums.hit_tokens
            group["output_tokens"] += sums.output_tokens
            group["cost"] += sums.cost
        out = []
        for i, bucket in enumerate(groups):
            results = [bucket[k] for k in sorted(bucket)]
            for r in results:
                r["cost"] = round(r["cost"], 8)
            start_time = (first + i) * bucket_s
            out.append(
                {
                    "object": "bucket",
                    "start_time": start_time,
                    "end_time": start_time + bucket_s,
                    "results": results,
                }
            )
        return out

    def close(self) -> None:
        """Close the file; a later `record` raises (ValueError) instead of losing the line."""
        with self._lock:
            if self._file is not None:
                self._file.close()
