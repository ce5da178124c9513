"""Billing windows and prices: explicit timestamps (no clock), exact boundaries and amounts."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from app.pricing import (
    BillingCalendar,
    ModelPrice,
    PriceBook,
    PricingSection,
    WindowRule,
    WindowsSection,
)

SHANGHAI = BillingCalendar(WindowsSection())
HOUR = 3600


def at(day: int, hh: int, mm: int = 0, ss: int = 0, tz: str = "Asia/Shanghai", month: int = 6):
    """Unix time of a 2024 local wall clock; in June 2024 day 3 is a Monday."""
    return datetime(2024, month, day, hh, mm, ss, tzinfo=ZoneInfo(tz)).timestamp()


@pytest.mark.parametrize(
    ("t", "window"),
    [
        (at(3, 9, 0), "peak"),
        (at(3, 8, 59, 59), "normal"),
        (at(3, 11, 59, 59), "peak"),
        (at(3, 12, 0), "normal"),
        (at(3, 13, 59, 59), "normal"),
        (at(3, 14, 0), "peak"),
        (at(3, 17, 59, 59), "peak"),
        (at(3, 18, 0), "normal"),
        (at(3, 21, 59, 59), "normal"),
        (at(3, 22, 0), "off_peak"),
        (at(3, 7, 59), "off_peak"),
        (at(3, 8, 0), "normal"),
        (at(3, 0, 30), "off_peak"),  # Monday 00:30
        (at(7, 23, 0), "off_peak"),  # Friday 23:00
        (at(8, 12, 0), "off_peak"),  # Saturday noon
        (at(9, 10, 0), "off_peak"),  # Sunday mid-morning: no weekend peak
    ],
)
def test_default_shanghai_windows(t, window):
    assert SHANGHAI.window_at(t) == window


def test_the_same_instant_is_read_in_the_configured_time_zone():
    t = at(3, 10, 0)  # Monday 10:00 in Shanghai = 02:00 UTC
    assert SHANGHAI.window_at(t) == "peak"
    assert BillingCalendar(WindowsSection(timezone="UTC")).window_at(t) == "off_peak"


def test_custom_rules_first_match_wins_and_the_rest_is_normal():
    cal = BillingCalendar(
        WindowsSection(
            timezone="UTC",
            rules=[
                WindowRule(window="off_peak", days=["sat"], start="10:00", end="11:00"),
                WindowRule(window="peak", start="08:00", end="20:00"),  # every day
            ],
        )
    )
    assert cal.window_at(at(8, 10, 30, tz="UTC")) == "off_peak"  # Saturday: first rule
    assert cal.window_at(at(8, 11, 0, tz="UTC")) == "peak"
    assert cal.window_at(at(4, 10, 30, tz="UTC")) == "peak"  # Tuesday
    assert cal.window_at(at(4, 20, 0, tz="UTC")) == "normal"
    assert cal.multiplier("peak") == 2.0 and cal.multiplier("off_peak") == 0.5


@pytest.mark.parametrize(
    "rule",
    [
        {"window": "peak", "start": "9:00", "end": "12:00"},
        {"window": "peak", "start": "09:60", "end": "12:00"},
        {"window": "peak", "start": "09:00", "end": "24:01"},
        {"window": "peak", "start": "12:00", "end": "12:00"},
        {"window": "peak", "start": "22:00", "end": "02:00"},
        {"window": "peak", "start": "24:00", "end": "24:00"},
        {"window": "peak", "days": ["mon", "fun"], "start": "09:00", "end": "12:00"},
        {"window": "peak", "days": [], "start": "09:00", "end": "12:00"},
        {"window": "normal", "start": "09:00", "end": "12:00"},
    ],
)
def test_invalid_rules_are_rejected(rule):
    with pytest.raises(ValidationError):
        WindowRule(**rule)


def test_invalid_rule_error_names_the_rule():
    with pytest.raises(ValidationError, match=r"peak rule 18:00-09:00"):
        WindowsSection(rules=[{"window": "peak", "start": "18:00", "end": "09:00"}])


def test_invalid_timezone_and_multipliers_are_rejected():
    with pytest.raises(ValidationError, match="unknown time zone 'Mars/Olympus'"):
        WindowsSection(timezone="Mars/Olympus")
    with pytest.raises(ValidationError, match="normal"):
        WindowsSection(multipliers={"peak": 2.0, "off_peak": 0.5})
    with pytest.raises(ValidationError):
        WindowsSection(multipliers={"peak": -1.0, "normal": 1.0, "off_peak": 0.5})


def test_next_change_and_seconds_until_not_across_a_weekend():
    assert SHANGHAI.next_change(at(7, 17, 0)) == at(7, 18, 0)  # Friday peak ends
    assert SHANGHAI.seconds_until_not(at(7, 17, 0), "peak") == HOUR
    assert SHANGHAI.seconds_until_not(at(7, 17, 0), "off_peak") == 0
    # Friday 23:00 off-peak runs through the weekend to Monday 08:00
    assert SHANGHAI.next_change(at(7, 23, 0)) == at(10, 8, 0)
    assert SHANGHAI.seconds_until_not(at(7, 23, 0), "off_peak") == 57 * HOUR
    assert SHANGHAI.next_change(at(3, 12, 0)) == at(3, 14, 0)  # lunch break
    assert SHANGHAI.next_change(at(3, 9, 0) - 1) == at(3, 9, 0)


def test_a_window_that_never_changes_has_no_next_change():
    everything = WindowsSection(rules=[WindowRule(window="peak", start="00:00", end="24:00")])
    for config in (everything, WindowsSection(rules=[])):
        cal = BillingCalendar(config)
        window = cal.window_at(at(3, 12))
        assert cal.next_change(at(3, 12)) == float("inf")
        assert cal.seconds_until_not(at(3, 12), window) == float("inf")


@pytest.mark.parametrize(
    ("tz", "saturday", "monday"),
    [("Europe/Berlin", (3, 30), (4, 1)), ("America/New_York", (3, 9), (3, 11))],
)
def test_dst_spring_forward(tz, saturday, monday):
    """Clocks go 02:00 -> 03:00 on the Sunday between `saturday` and `monday` (month, day)."""
    cal = BillingCalendar(WindowsSection(timezone=tz))
    assert cal.window_at(at(monday[1], 9, 30, tz=tz, month=monday[0])) == "peak"
    assert cal.window_at(at(monday[1], 8, 30, tz=tz, month=monday[0])) == "normal"
    # Saturday 23:00 to Monday 08:00 is 33 hours on the wall clock, 32 in fact
    t = at(saturday[1], 23, tz=tz, month=saturday[0])
    assert cal.seconds_until_not(t, "off_peak") == 32 * HOUR


def test_dst_boundaries_inside_the_skipped_and_repeated_hour():
    rules = [WindowRule(window="peak", start="02:30", end="02:45")]
    cal = BillingCalendar(WindowsSection(timezone="Europe/Berlin", rules=rules))
    # 2024-03-31: 02:00-03:00 never happens, so the window never opens that night
    assert cal.next_change(at(31, 1, 0, tz="Europe/Berlin", month=3)) == at(
        1, 2, 30, tz="Europe/Berlin", month=4
    )
    # a window opening inside the skipped hour opens when the clock jumps past its start
    rules = [WindowRule(window="peak", start="02:30", end="04:00")]
    jumpy = BillingCalendar(WindowsSection(timezone="Europe/Berlin", rules=rules))
    jump = at(31, 3, 0, tz="Europe/Berlin", month=3)
    assert jumpy.next_change(jump - 2 * HOUR) == jump and jumpy.window_at(jump) == "peak"
    assert jumpy.window_at(jump - 1) == "normal"
    # 2024-10-27: 02:00-03:00 happens twice, so the window opens twice
    first = at(27, 2, 30, tz="Europe/Berlin", month=10)
    assert cal.window_at(first) == "peak"
    assert cal.next_change(first) == first + 15 * 60
    assert cal.next_change(first + 15 * 60) == first + HOUR
    assert cal.window_at(first + HOUR) == "peak"
    assert cal.next_change(first + HOUR) == first + HOUR + 15 * 60


MILLION = 1_000_000


def charge_args(window: str = "normal", tier: str = "default", model: str = "small"):
    return dict(
        model=model,
        tier=tier,
        window=window,
        hit_tokens=MILLION,
        miss_tokens=2 * MILLION,
        output_tokens=MILLION // 2,
    )


def test_charge_applies_prices_and_window_multipliers():
    book = PriceBook(PricingSection())
    # 1M x 0.07 + 2M x 0.27 + 0.5M x 1.10 = 0.07 + 0.54 + 0.55 = 1.16
    normal = book.charge(**charge_args("normal"))
    assert (normal.amount, normal.multiplier, normal.currency) == (1.16, 1.0, "USD")
    peak = book.charge(**charge_args("peak"))
    assert (peak.amount, peak.window, peak.multiplier) == (2.32, "peak", 2.0)
    assert (peak.input_cache_hit, peak.input_cache_miss, peak.output) == (0.14, 1.08, 1.1)
    off = book.charge(**charge_args("off_peak"))
    assert (off.amount, off.multiplier) == (0.58, 0.5)
    assert (off.input_cache_hit, off.input_cache_miss, off.output) == (0.035, 0.27, 0.275)
    assert book.charge("small", "default", "peak", 0, 0, 0).amount == 0


def test_model_specific_price_and_tier_multipliers():
    big = ModelPrice(input_cache_hit=0.5, input_cache_miss=2.0, output=8.0)
    book = PriceBook(
        PricingSection(
            currency="CNY",
            models={"big": big},
            tier_multipliers={"priority": 1.5, "flex": 0.5},
        )
    )
    assert book.price("big") == big and book.price("small") == ModelPrice()
    # 1M x 0.5 + 2M x 2 + 0.5M x 8 = 8.5
    assert book.charge(**charge_args(model="big")).amount == 8.5
    assert book.charge(**charge_args(model="big")).currency == "CNY"
    flex_peak = book.charge(**charge_args("peak", "flex"))
    assert (flex_peak.amount, flex_peak.multiplier) == (1.16, 1.0)  # x2 window x0.5 tier
    assert book.charge(**charge_args(tier="priority")).amount == 1.74
    assert book.section.tier_multipliers["default"] == 1.0  # unlisted tiers default to 1.0
    assert book.charge(**charge_args(tier="auto")) == book.charge(**charge_args())
    with pytest.raises(ValueError, match="unknown service tier"):
        book.charge(**charge_args(tier="scale"))


def test_pricing_section_rejects_unknown_tiers_and_negative_prices():
    with pytest.raises(ValidationError):
        PricingSection(tier_multipliers={"scale": 1.0})
    with pytest.raises(ValidationError):
        ModelPrice(output=-1.0)
