"""The per-tenant usage ledger: one `UsageRecord` per billed request, and usage buckets.

Records append to a JSON-lines file (one flushed line each) and are replayed from it on start;
a torn or garbage line is skipped with a warning. `Ledger.buckets` aggregates them the way
OpenAI's usage API does: time buckets aligned to multiples of `bucket_s` since the epoch,
results grouped by (tenant, model, service_tier, window).

Limit: every record is held in memory (one list sorted by time) and the file is never
compacted; fine for one node's ledger, not for years of heavy traffic.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import pathlib
import threading
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


class Ledger:
    """Usage records in memory (sorted by time), mirrored to `path` when given. Thread-safe."""

    def __init__(self, path: pathlib.Path | None = None):
        self.path = path
        self._lock = threading.Lock()
        self._records: list[UsageRecord] = []
        self._file: IO[str] | None = None
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        torn = False
        if path.exists():
            data = path.read_bytes()
            self._records = sorted(self._replay(data), key=_time)
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

    def records(self, start: float, end: float) -> list[UsageRecord]:
        """Records with start <= time < end, oldest first."""
        with self._lock:
            lo = bisect.bisect_left(self._records, start, key=_time)
            hi = bisect.bisect_left(self._records, end, key=_time)
            return self._records[lo:hi]

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
        for rec in self.records(start, end):
            if tenant is not None and rec.tenant != tenant:
                continue
            # currency is part of the key so a price-currency change never sums two currencies
            key = (rec.tenant, rec.model, rec.service_tier, rec.window, rec.currency)
            bucket = groups[math.floor(rec.time / bucket_s) - first]
            group = bucket.get(key) or bucket.setdefault(key, _empty_result(rec))
            group["num_model_requests"] += 1
            group["input_tokens"] += rec.input_cache_hit_tokens + rec.input_cache_miss_tokens
            group["input_cached_tokens"] += rec.input_cache_hit_tokens
            group["output_tokens"] += rec.output_tokens
            group["cost"] += rec.cost
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
