"""Usage ledger: bucket aggregation, tenant filter, replay after restart, torn lines, threads."""

from __future__ import annotations

import threading

import pytest

from app.ledger import MAX_BUCKETS, Ledger, UsageRecord

DAY = 86400
T0 = 1_717_372_800  # 2024-06-03 00:00 UTC, a multiple of DAY


def NOW() -> float:  # noqa: N802 - a clock: every record here is recent, held as it is
    return T0


def rec(t: float, tenant: str = "acme", **kw) -> UsageRecord:
    fields = dict(
        time=t,
        request_id=f"req-{t}",
        tenant=tenant,
        model="small",
        service_tier="default",
        window="normal",
        status="ok",
        input_cache_hit_tokens=10,
        input_cache_miss_tokens=5,
        output_tokens=7,
        cost=0.1,
        currency="USD",
    )
    return UsageRecord(**(fields | kw))


def fill(ledger: Ledger) -> None:
    ledger.record(rec(T0 + 100))
    ledger.record(rec(T0 + 50, cost=0.2, status="error"))  # out of order on purpose
    ledger.record(rec(T0 + 200, window="peak"))
    ledger.record(rec(T0 + 300, tenant="beta", output_tokens=1))
    ledger.record(rec(T0 + 2 * DAY + 5, service_tier="flex", cost=0.3))


def test_record_round_trips_through_json():
    r = rec(T0 + 0.25)
    assert UsageRecord.from_json(r.to_json()) == r
    with pytest.raises(ValueError):
        UsageRecord.from_json('{"time": 1.0}')


def test_records_aggregate_into_buckets_and_groups():
    ledger = Ledger(clock=NOW)
    fill(ledger)
    buckets = ledger.buckets(T0, T0 + 3 * DAY)
    assert [(b["start_time"], b["end_time"]) for b in buckets] == [
        (T0 + i * DAY, T0 + (i + 1) * DAY) for i in range(3)
    ]
    assert all(b["object"] == "bucket" for b in buckets)
    day0 = buckets[0]["results"]
    assert [(r["tenant"], r["window"]) for r in day0] == [
        ("acme", "normal"),
        ("acme", "peak"),
        ("beta", "normal"),
    ]
    assert day0[0] == {
        "object": "usage.result",
        "tenant": "acme",
        "model": "small",
        "service_tier": "default",
        "window": "normal",
        "num_model_requests": 2,  # the error counts too
        "input_tokens": 30,
        "input_cached_tokens": 20,
        "output_tokens": 14,
        "cost": 0.3,
        "currency": "USD",
    }
    assert day0[2]["output_tokens"] == 1
    assert buckets[1]["results"] == []  # empty bucket in between
    assert [(r["service_tier"], r["cost"]) for r in buckets[2]["results"]] == [("flex", 0.3)]


def test_range_is_half_open_and_buckets_are_aligned():
    ledger = Ledger(clock=NOW)
    fill(ledger)
    # [T0 + 100, T0 + 200) overlaps only day 0 and excludes the record at T0 + 200
    (bucket,) = ledger.buckets(T0 + 100, T0 + 200)
    assert bucket["start_time"] == T0
    assert sum(r["num_model_requests"] for r in bucket["results"]) == 1
    hours = ledger.buckets(T0 + 30, T0 + 2 * 3600 + 1, bucket_s=3600)
    assert [b["start_time"] for b in hours] == [T0, T0 + 3600, T0 + 7200]
    assert ledger.buckets(T0 + 10, T0 + 10) == []


def test_tenant_filter():
    ledger = Ledger(clock=NOW)
    fill(ledger)
    buckets = ledger.buckets(T0, T0 + 3 * DAY, tenant="beta")
    assert len(buckets) == 3
    assert [r["tenant"] for b in buckets for r in b["results"]] == ["beta"]
    assert ledger.buckets(T0, T0 + DAY, tenant="nobody")[0]["results"] == []


def test_bucket_limit():
    ledger = Ledger(clock=NOW)
    assert len(ledger.buckets(T0, T0 + MAX_BUCKETS * 60, bucket_s=60)) == MAX_BUCKETS
    with pytest.raises(ValueError, match="at most 1000"):
        ledger.buckets(T0, T0 + MAX_BUCKETS * 60 + 1, bucket_s=60)
    with pytest.raises(ValueError):
        ledger.buckets(T0, T0 + 1, bucket_s=0)


def test_restart_replays_the_same_buckets(tmp_path):
    path = tmp_path / "nested" / "usage.jsonl"
    ledger = Ledger(path, clock=NOW)
    fill(ledger)
    before = ledger.buckets(T0, T0 + 3 * DAY)
    ledger.close()
    with pytest.raises(ValueError):
        ledger.record(rec(T0 + 1))  # closed: refuse rather than silently drop the line
    assert len(path.read_text().splitlines()) == 5
    assert Ledger(path, clock=NOW).buckets(T0, T0 + 3 * DAY) == before


def test_torn_and_garbage_lines_are_skipped_and_appends_continue(tmp_path, caplog):
    path = tmp_path / "usage.jsonl"
    ledger = Ledger(path, clock=NOW)
    ledger.record(rec(T0 + 1))
    ledger.close()
    whole = rec(T0 + 2).to_json()
    with path.open("a") as f:
        f.write("not json\n" + '{"time": "x"}\n' + whole[: len(whole) // 2])  # crash mid-write
    ledger = Ledger(path, clock=NOW)
    assert len(caplog.records) == 3 and "skipped" in caplog.records[0].message
    ledger.record(rec(T0 + 3))
    ledger.close()
    buckets = Ledger(path, clock=NOW).buckets(T0, T0 + DAY)
    assert buckets[0]["results"][0]["num_model_requests"] == 2


def test_concurrent_records_lose_nothing(tmp_path):
    path = tmp_path / "usage.jsonl"
    ledger = Ledger(path, clock=NOW)

    def worker(n: int) -> None:
        for i in range(200):
            ledger.record(rec(T0 + i, tenant=f"t{n}", request_id=f"{n}-{i}"))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ledger.close()
    for replayed in (ledger, Ledger(path, clock=NOW)):
        results = replayed.buckets(T0, T0 + DAY)[0]["results"]
        assert [(r["tenant"], r["num_model_requests"]) for r in results] == [
            (f"t{n}", 200) for n in range(4)
        ]
    assert len(path.read_text().splitlines()) == 800


def test_old_records_fold_into_minutes_with_the_same_buckets(tmp_path):
    """Memory is bounded by time: records older than `exact_s` become per-minute sums per
    group, and the usage buckets (minute-aligned) come out exactly as from the records."""
    path = tmp_path / "usage.jsonl"
    exact = Ledger(path, clock=NOW)
    for i in range(3000):  # 50 requests a minute for an hour, two tenants
        exact.record(rec(T0 + i * 1.2, tenant="ab"[i % 2], cost=0.001 * (i % 7)))
    fill(exact)
    for width in (60, 3600, DAY):
        want = exact.buckets(T0, T0 + 3 * DAY, bucket_s=width) if width > 60 else None
        later = Ledger(path, clock=lambda: T0 + 10 * DAY)  # replayed ten days later
        assert later.records(T0, T0 + 3 * DAY) == []  # nothing held as it was
        assert len(later._minutes) <= 61 + 2  # an hour of minutes, plus fill()'s day 2
        if want is not None:
            assert later.buckets(T0, T0 + 3 * DAY, bucket_s=width) == want
    folding = Ledger(clock=lambda: T0 + 2 * DAY)  # folds as records arrive
    for r in exact.records(T0, T0 + 3 * DAY):
        folding.record(r)
    assert len(folding._records) == 1  # only fill()'s day-2 record is recent
    assert folding.buckets(T0, T0 + 3 * DAY, bucket_s=3600) == exact.buckets(
        T0, T0 + 3 * DAY, bucket_s=3600
    )
