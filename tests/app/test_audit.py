"""Audit log: line format, PII masking, daily files, retention, disabled log, restart."""

from __future__ import annotations

import json
import threading
from dataclasses import fields
from datetime import date, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.audit import AuditLog, AuditRecord, AuditSection

DAY = 86400
T0 = 1_795_392_000  # 2026-11-23 00:00:00 UTC
KEYS = [f.name for f in fields(AuditRecord)] + ["ts"]


def ok_record(t: float = T0 + 36000.123, **kw) -> AuditRecord:
    data = dict(
        time=t,
        request_id="chatcmpl-3f2a9c41b8e5d7a6",
        tenant="acme",
        model="smollm2-135m",
        route="/v1/chat/completions",
        status="ok",
        http_status=200,
        service_tier="default",
        window="peak",
        prompt_tokens=1200,
        cached_tokens=1024,
        completion_tokens=64,
        cost=0.00042,
        currency="USD",
        latency_ms=812.5,
        user="team-7",
    )
    return AuditRecord(**(data | kw))


def make_log(tmp_path: Path, now: float = T0 + 36000, **kw) -> AuditLog:
    return AuditLog(AuditSection(path=tmp_path / "audit", **kw), clock=lambda: now)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_section_defaults_and_validation():
    s = AuditSection()
    assert (s.enabled, s.path, s.retention_days) == (
        True,
        Path("~/.cache/dualpath-serve/audit"),
        90,
    )
    with pytest.raises(ValidationError):
        AuditSection(retention_days=0)
    with pytest.raises(ValidationError):
        AuditSection(retention=3)


def test_success_and_failure_lines(tmp_path):
    log = make_log(tmp_path)
    log.write(ok_record())
    log.write(
        ok_record(
            T0 + 36001,
            request_id="chatcmpl-9",
            route="handle:chat",
            status="error",
            http_status=503,
            service_tier="priority",
            completion_tokens=0,
            cost=0.0,
            error_code="overloaded",
            latency_ms=3.0,
            user=None,
        )
    )
    log.close()
    path = tmp_path / "audit" / "audit-2026-11-23.jsonl"
    ok, err = lines(path)
    assert list(ok) == KEYS and list(err) == KEYS
    assert ok == {
        "time": T0 + 36000.123,
        "request_id": "chatcmpl-3f2a9c41b8e5d7a6",
        "tenant": "acme",
        "model": "smollm2-135m",
        "route": "/v1/chat/completions",
        "status": "ok",
        "http_status": 200,
        "service_tier": "default",
        "window": "peak",
        "prompt_tokens": 1200,
        "cached_tokens": 1024,
        "completion_tokens": 64,
        "cost": 0.00042,
        "currency": "USD",
        "error_code": None,
        "latency_ms": 812.5,
        "user": "team-7",
        "ts": "2026-11-23T10:00:00.123Z",
    }
    assert (err["status"], err["http_status"], err["error_code"]) == ("error", 503, "overloaded")
    assert (err["route"], err["user"], err["ts"]) == (
        "handle:chat",
        None,
        "2026-11-23T10:00:01.000Z",
    )
    assert path.read_text().endswith("}\n") and path.read_text().count("\n") == 2


def test_pii_in_strings_is_masked(tmp_path):
    log = make_log(tmp_path)
    log.write(ok_record(user="jane.doe@example.com", tenant="call 13800138000"))
    log.close()
    (line,) = lines(tmp_path / "audit" / "audit-2026-11-23.jsonl")
    assert (line["user"], line["tenant"]) == ("[EMAIL]", "call [PHONE]")
    assert line["request_id"] == "chatcmpl-3f2a9c41b8e5d7a6"  # ids stay
    assert "example.com" not in (tmp_path / "audit" / "audit-2026-11-23.jsonl").read_text()


def test_lines_are_flushed_before_close(tmp_path):
    log = make_log(tmp_path)
    log.write(ok_record())
    assert len(lines(tmp_path / "audit" / "audit-2026-11-23.jsonl")) == 1
    log.close()


def test_day_rollover_opens_a_second_file(tmp_path):
    log = make_log(tmp_path)
    log.write(ok_record(T0 + DAY - 0.001))
    log.write(ok_record(T0 + DAY))
    log.write(ok_record(T0 + DAY + 60))
    log.close()
    d = tmp_path / "audit"
    assert sorted(p.name for p in d.iterdir()) == [
        "audit-2026-11-23.jsonl",
        "audit-2026-11-24.jsonl",
    ]
    (first,) = lines(d / "audit-2026-11-23.jsonl")
    assert first["ts"] == "2026-11-23T23:59:59.999Z"
    assert [r["ts"] for r in lines(d / "audit-2026-11-24.jsonl")] == [
        "2026-11-24T00:00:00.000Z",
        "2026-11-24T00:01:00.000Z",
    ]


def test_retention_deletes_only_old_audit_files(tmp_path):
    d = tmp_path / "audit"
    d.mkdir()
    today = date(2026, 11, 23)
    for age in (400, 31, 30, 29, 0):
        (d / f"audit-{today - timedelta(days=age)}.jsonl").write_text("{}\n")
    keep = ["notes.txt", "audit-2020-01-01.jsonl.bak", "audit-2020-13-45.jsonl", "old-audit.jsonl"]
    for name in keep:
        (d / name).write_text("x")
    (d / "audit-2020-01-02.jsonl").mkdir()  # not a file: left alone

    log = make_log(tmp_path, retention_days=30)
    left = sorted(p.name for p in d.iterdir())
    assert left == sorted(
        keep
        + ["audit-2020-01-02.jsonl"]
        + [f"audit-{today - timedelta(days=age)}.jsonl" for age in (30, 29, 0)]
    )
    log.close()


def test_retention_runs_again_at_day_change(tmp_path):
    now = [T0]
    log = AuditLog(AuditSection(path=tmp_path, retention_days=2), clock=lambda: now[0])
    log.write(ok_record(T0))
    (tmp_path / "audit-2026-11-21.jsonl").write_text("{}\n")  # 3 days old tomorrow
    (tmp_path / "audit-2026-11-22.jsonl").write_text("{}\n")
    now[0] = T0 + DAY
    log.write(ok_record(T0 + DAY))
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "audit-2026-11-22.jsonl",
        "audit-2026-11-23.jsonl",
        "audit-2026-11-24.jsonl",
    ]


def test_disabled_log_writes_nothing(tmp_path):
    log = make_log(tmp_path, enabled=False)
    log.write(ok_record())
    log.close()
    assert not (tmp_path / "audit").exists()


def test_restart_appends_to_the_same_days_file(tmp_path):
    log = make_log(tmp_path)
    log.write(ok_record(request_id="first"))
    log.close()
    log = make_log(tmp_path)
    log.write(ok_record(T0 + 50000, request_id="second"))
    log.close()
    log.close()  # idempotent
    path = tmp_path / "audit" / "audit-2026-11-23.jsonl"
    assert [r["request_id"] for r in lines(path)] == ["first", "second"]


def test_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    log = AuditLog(AuditSection(path=Path("~/logs/audit")), clock=lambda: T0)
    log.write(ok_record(T0))
    log.close()
    assert (tmp_path / "logs" / "audit" / "audit-2026-11-23.jsonl").is_file()


def test_concurrent_writes_keep_whole_lines(tmp_path):
    log = make_log(tmp_path)

    def worker(n: int) -> None:
        for i in range(50):
            log.write(ok_record(T0 + i, request_id=f"req-{n}-{i}"))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    ids = {r["request_id"] for r in lines(tmp_path / "audit" / "audit-2026-11-23.jsonl")}
    assert len(ids) == 200
