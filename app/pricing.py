"""Billing windows (peak / normal / off-peak) and per-model prices: the cost of one request.

`WindowsSection` names local wall-clock spans per weekday in one time zone; the first matching
`WindowRule` wins and any time no rule covers is "normal". `BillingCalendar` answers which
window a unix time falls in and when that changes (DST-correct through zoneinfo).
`PriceBook.charge` turns token counts into money: per-1M-token prices × window × tier
multipliers. Pure: no clock, no I/O; callers pass the time.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from deployments.options import Section

WindowName = Literal["peak", "normal", "off_peak"]
Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
TierName = Literal["priority", "default", "flex"]
DAYS: tuple[Day, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
WINDOWS: tuple[WindowName, ...] = ("peak", "normal", "off_peak")
TIERS: tuple[TierName, ...] = ("priority", "default", "flex")
NonNegative = Annotated[float, Field(ge=0)]


def parse_hhmm(value: str) -> int:
    """Minutes since local midnight of an "HH:MM" time, 0..1440 ("24:00" ends the day)."""
    match = re.fullmatch(r"(\d{2}):(\d{2})", value)
    minutes = int(match.group(1)) * 60 + int(match.group(2)) if match else -1
    if not match or int(match.group(2)) > 59 or not 0 <= minutes <= 1440:
        raise ValueError(f"not a time of day: {value!r} (expected 'HH:MM', 00:00..24:00)")
    return minutes


class WindowRule(Section):
    """`window` applies on `days` from `start` (inclusive) to `end` (exclusive), local time."""

    window: Literal["peak", "off_peak"]
    days: list[Day] = Field(default_factory=lambda: list(DAYS), min_length=1)
    start: str = Field(description="'HH:MM', 00:00..23:59")
    end: str = Field(description="'HH:MM', 00:01..24:00, after start (no wrap past midnight)")

    @model_validator(mode="after")
    def _check_span(self) -> WindowRule:
        name = f"{self.window} rule {self.start}-{self.end} ({','.join(self.days)})"
        try:
            start, end = parse_hhmm(self.start), parse_hhmm(self.end)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if end <= start:
            raise ValueError(f"{name}: end must be after start (split a span past midnight)")
        return self

    @property
    def span(self) -> tuple[int, int]:
        return parse_hhmm(self.start), parse_hhmm(self.end)


_WEEKDAYS: list[Day] = ["mon", "tue", "wed", "thu", "fri"]
_WEEKEND: list[Day] = ["sat", "sun"]


def default_rules() -> list[WindowRule]:
    """Modelled on DeepSeek's: weekday business hours peak; nights and weekends off-peak."""
    spans = [
        ("peak", _WEEKDAYS, "09:00", "12:00"),
        ("peak", _WEEKDAYS, "14:00", "18:00"),
        ("off_peak", _WEEKDAYS, "00:00", "08:00"),
        ("off_peak", _WEEKDAYS, "22:00", "24:00"),
        ("off_peak", _WEEKEND, "00:00", "24:00"),
    ]
    return [WindowRule(window=w, days=d, start=s, end=e) for w, d, s, e in spans]


class WindowsSection(Section):
    timezone: str = Field(default="Asia/Shanghai", description="IANA zone the rules read in")
    rules: list[WindowRule] = Field(default_factory=default_rules, description="first match wins")
    multipliers: dict[WindowName, NonNegative] = Field(
        default_factory=lambda: {"peak": 2.0, "normal": 1.0, "off_peak": 0.5},
        description="price multiplier per window; all three required",
    )

    @field_validator("timezone")
    @classmethod
    def _check_timezone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: "Europe" is a directory
            raise ValueError(f"unknown time zone {v!r} (an IANA name such as 'UTC')") from None
        return v

    @field_validator("multipliers")
    @classmethod
    def _check_multipliers(cls, v: dict[WindowName, float]) -> dict[WindowName, float]:
        if missing := [w for w in WINDOWS if w not in v]:
            raise ValueError(f"multipliers missing for window(s): {', '.join(missing)}")
        return v


class BillingCalendar:
    """Which window a unix time is in, evaluated on the wall clock of `config.timezone`."""

    def __init__(self, config: WindowsSection):
        self.config = config
        self.tz = ZoneInfo(config.timezone)
        # weekday (0 = mon) -> [(start_min, end_min, window)] in rule order
        self._rules: list[list[tuple[int, int, WindowName]]] = [[] for _ in DAYS]
        for rule in config.rules:
            for day in dict.fromkeys(rule.days):
                self._rules[DAYS.index(day)].append((*rule.span, rule.window))
        # weekday -> local minutes where the window may change; midnight always (day change)
        self._marks = [
            sorted({0, *(m for start, end, _ in r for m in (start, end) if m < 1440)})
            for r in self._rules
        ]

    def window_at(self, t: float) -> WindowName:
        local = datetime.fromtimestamp(t, self.tz)
        minute = local.hour * 60 + local.minute  # boundaries are whole minutes
        for start, end, window in self._rules[local.weekday()]:
            if start <= minute < end:
                return window
        return "normal"

    def multiplier(self, window: WindowName) -> float:
        return self.config.multipliers[window]

    def next_change(self, t: float) -> float:
        """The first unix time > t at which `window_at` differs from `window_at(t)`; inf if never.

        Between two consecutive candidates (every rule boundary at both folds, plus each DST
        transition) the wall clock moves monotonically past no boundary, so the window is
        constant there and checking the candidates alone is exact."""
        current = self.window_at(t)
        today = datetime.fromtimestamp(t, self.tz).date()
        candidates: set[float] = set()
        for offset in range(-1, 9):
            day = today + timedelta(days=offset)
            for minute in self._marks[day.weekday()]:
                wall = datetime.combine(day, time(minute // 60, minute % 60), tzinfo=self.tz)
                candidates |= {wall.timestamp(), wall.replace(fold=1).timestamp()}
            if (transition := self._transition(day)) is not None:
                candidates.add(transition)
        for c in sorted(c for c in candidates if c > t):
            if self.window_at(c) != current:
                return c
        return math.inf

    def seconds_until_not(self, t: float, window: WindowName) -> float:
        """0 if `t` is outside `window`, else how long until it leaves it (inf if never)."""
        return 0.0 if self.window_at(t) != window else self.next_change(t) - t

    def _transition(self, day: date) -> float | None:
        """The instant the UTC offset changes during local `day`, if it does (one per day)."""
        lo = datetime.combine(day, time(), tzinfo=self.tz).timestamp()
        hi = datetime.combine(day + timedelta(days=1), time(), tzinfo=self.tz).timestamp()
        lo, hi = math.floor(lo), math.ceil(hi)
        target = self._offset(hi)
        if self._offset(lo) == target:
            return None
        while hi - lo > 1:  # invariant: offset(lo) != target == offset(hi)
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if self._offset(mid) == target else (mid, hi)
        return float(hi)

    def _offset(self, t: float) -> timedelta | None:
        return datetime.fromtimestamp(t, self.tz).utcoffset()


class ModelPrice(Section):
    """Currency units per 1M tokens."""

    input_cache_hit: NonNegative = 0.07
    input_cache_miss: NonNegative = 0.27
    output: NonNegative = 1.10


class PricingSection(Section):
    currency: str = "USD"
    default: ModelPrice = Field(default_factory=ModelPrice, description="models not listed")
    models: dict[str, ModelPrice] = Field(
        default_factory=dict, description="served model name -> price"
    )
    tier_multipliers: dict[TierName, NonNegative] = Field(
        default_factory=lambda: dict.fromkeys(TIERS, 1.0), description="missing tiers: 1.0"
    )
    windows: WindowsSection = Field(default_factory=WindowsSection)

    @field_validator("tier_multipliers")
    @classmethod
    def _fill_tiers(cls, v: dict[TierName, float]) -> dict[TierName, float]:
        return dict.fromkeys(TIERS, 1.0) | v


@dataclass(frozen=True, slots=True)
class Charge:
    amount: float  # sum of the parts, rounded to 8 decimal places
    currency: str
    window: WindowName
    multiplier: float  # window multiplier × tier multiplier
    input_cache_hit: float  # the parts, after multipliers, rounded to 8 decimal places
    input_cache_miss: float
    output: float


class PriceBook:
    def __init__(self, section: PricingSection):
        self.section = section
        self.calendar = BillingCalendar(section.windows)

    def price(self, model: str) -> ModelPrice:
        return self.section.models.get(model, self.section.default)

    def charge(
        self,
        model: str,
        tier: str,
        window: WindowName,
        hit_tokens: int,
        miss_tokens: int,
        output_tokens: int,
    ) -> Charge:
        """`tier` "auto" bills as "default"; an unknown tier is a ValueError."""
        tier = "default" if tier == "auto" else tier
        if tier not in TIERS:
            raise ValueError(f"unknown service tier {tier!r} (expected one of {TIERS} or 'auto')")
        p = self.price(model)
        mult = self.calendar.multiplier(window) * self.section.tier_multipliers[tier]
        tokens = (hit_tokens, miss_tokens, output_tokens)
        units = (p.input_cache_hit, p.input_cache_miss, p.output)
        parts = [n * unit / 1e6 * mult for n, unit in zip(tokens, units, strict=True)]
        hit, miss, out = (round(x, 8) for x in parts)
        return Charge(round(sum(parts), 8), self.section.currency, window, mult, hit, miss, out)
