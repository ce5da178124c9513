"""The audit log: who used which model, when, through which route, how it ended, what it cost.

One `AuditRecord` per request, written as one JSON object per line (keys in field order, then
`"ts"`, the record's time as ISO-8601 UTC with milliseconds) to a daily file
`<path>/audit-YYYY-MM-DD.jsonl` (UTC day of the record's time); each line is flushed at once.
Every string value passes through `app.pii.mask` first (tenant, user, error_code, ...). Prompts
and completions are never written: a record has no field for them.

Retention: when the log starts and whenever it opens another day's file, files named exactly
`audit-YYYY-MM-DD.jsonl` dated more than `retention_days` before today (UTC, from `clock`) are
deleted; a file exactly `retention_days` old stays, anything else in the directory is left alone.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import IO

from pydantic import Field

from app.pii import mask_value
from deployments.options import Section

logger = logging.getLogger(__name__)

_NAME = re.compile(r"audit-(\d{4}-\d{2}-\d{2})\.jsonl")


class AuditSection(Section):
    enabled: bool = True
    path: Path = Field(
        default=Path("~/.cache/dualpath-serve/audit"), description="directory of the daily files"
    )
    retention_days: int = Field(default=90, ge=1, description="days of files kept before today")


@dataclass(frozen=True, slots=True)
class AuditRecord:
    time: float  # unix seconds
    request_id: str
    tenant: str
    model: str
    route: str  # e.g. "/v1/chat/completions" or "handle:chat"
    status: str  # "ok" | "error" | "cancelled" | "rejected"
    http_status: int
    service_tier: str | None = None
    window: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    currency: str = "USD"
    error_code: str | None = None
    latency_ms: float | None = None
    user: str | None = None  # the request's `user` field (masked like every string)


def _utc(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def iso_utc(t: float) -> str:
    """`2026-11-23T10:00:00.123Z`."""
    return _utc(t).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def to_line(record: AuditRecord) -> str:
    data = mask_value(asdict(record)) | {"ts": iso_utc(record.time)}
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n"


class AuditLog:
    """Appends records to the day's file; thread-safe. Disabled: writes nothing, creates no
    directory. A write after `close` opens the file again."""

    def __init__(self, section: AuditSection, clock: Callable[[], float] = time.time):
        self.section = section
        self.clock = clock
        self.dir = section.path.expanduser()
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        self._day: date | None = None
        if section.enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._purge()

    def path_for(self, day: date) -> Path:
        return self.dir / f"audit-{day.isoformat()}.jsonl"

    def write(self, record: AuditRecord) -> None:
        if not self.section.enabled:
            return
        line = to_line(record)
        day = _utc(record.time).date()
        with self._lock:
            if self._file is None or day != self._day:
                self._open(day)
            assert self._file is not None
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
            self._file, self._day = None, None

    def _open(self, day: date) -> None:
        if self._file is not None:
            self._file.close()
            self._purge()
        self.dir.mkdir(parents=True, exist_ok=True)
        self._file = self.path_for(day).open("a", encoding="utf-8")
        self._day = day

    def _purge(self) -> None:
        cutoff = _utc(self.clock()).date() - timedelta(days=self.section.retention_days)
        for path in self.dir.iterdir():
            match = _NAME.fullmatch(path.name)
            try:
                if match and date.fromisoformat(match.group(1)) < cutoff and path.is_file():
                    path.unlink()
            except (ValueError, OSError) as e:  # not a real date, or already gone
                logger.debug("audit retention skipped %s: %s", path, e)
