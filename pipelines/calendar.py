"""Business calendars: working days, holidays and a time zone, so "5 working days" means what a rep means.

Durations are written ``90m``, ``72h``, ``3d`` (calendar time) or ``5wd`` (working days). A working-day deadline
keeps the local time of day of its start and skips weekends and holidays; a start outside working days counts
from the beginning of the next working day.

>>> cal = BusinessCalendar.parse_spec({"timezone": "Europe/Berlin", "holidays": ["2026-12-25"]}, "default")
>>> start = iso_ms("2026-12-23T10:00:00+01:00")  # a Wednesday
>>> ms_iso(cal.deadline(start, Duration.parse("2wd")), "Europe/Berlin")  # skips the 25th, Sat and Sun
'2026-12-28T10:00:00+01:00'
>>> ms_iso(cal.deadline(start, Duration.parse("72h")), "Europe/Berlin")
'2026-12-26T10:00:00+01:00'
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(m|h|d|w|wd)\s*$")
_UNIT_MS = {"m": MINUTE_MS, "h": HOUR_MS, "d": DAY_MS, "w": 7 * DAY_MS}


def iso_ms(text: str) -> int:
    """Epoch milliseconds of an RFC 3339 time."""
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def ms_iso(ms: int, tz: str = "UTC") -> str:
    """RFC 3339 text of epoch milliseconds, in ``tz``."""
    return datetime.fromtimestamp(ms / 1000, ZoneInfo(tz)).isoformat()


@dataclass(frozen=True, slots=True)
class Duration:
    """A calendar duration (``ms``) or a number of working days (``working_days``)."""

    ms: int = 0
    working_days: float = 0.0
    text: str = ""

    @classmethod
    def parse(cls, text: Any) -> Duration:
        """``'72h'``, ``'3d'``, ``'2w'``, ``'90m'`` or ``'5wd'`` (working days); ValueError otherwise.

        >>> Duration.parse("3d").ms == Duration.parse("72h").ms, Duration.parse("5wd").working_days
        (True, 5.0)
        """
        match = _DURATION.match(str(text)) if isinstance(text, str | int) and not isinstance(text, bool) else None
        if not match:
            raise ValueError(f"{text!r} is not a duration like 90m, 72h, 3d, 2w or 5wd (working days)")
        amount, unit = float(match.group(1)), match.group(2)
        if amount <= 0:
            raise ValueError(f"{text!r}: a duration must be positive")
        if unit == "wd":
            return cls(working_days=amount, text=str(text).strip())
        return cls(ms=int(amount * _UNIT_MS[unit]), text=str(text).strip())

    @property
    def nominal_ms(self) -> int:
        """A calendar-time upper bound, for sizing windows (a working day counts as two calendar days)."""
        return self.ms or int(self.working_days * 2 * DAY_MS) + 4 * DAY_MS


@dataclass(frozen=True)
class BusinessCalendar:
    """Working weekdays, holidays and a time zone of one region."""

    name: str = "default"
    timezone: str = "UTC"
    workdays: frozenset[int] = frozenset(range(5))  # Monday = 0
    holidays: frozenset[date] = frozenset()

    @classmethod
    def parse_spec(cls, raw: dict[str, Any], name: str) -> BusinessCalendar:
        """From a config mapping ``{timezone, workdays: [mon, ...], holidays: [YYYY-MM-DD, ...]}``."""
        tz = str(raw.get("timezone", "UTC"))
        try:
            ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {tz!r} (use an IANA name such as Europe/Berlin)") from exc
        days = raw.get("workdays", list(WEEKDAYS[:5]))
        if not isinstance(days, list) or not days or any(d not in WEEKDAYS for d in days):
            raise ValueError(f"workdays is a list of {', '.join(WEEKDAYS)}")
        holidays = raw.get("holidays", []) or []
        if not isinstance(holidays, list):
            raise ValueError("holidays is a list of dates (YYYY-MM-DD)")
        parsed = []
        for item in holidays:
            try:
                parsed.append(item if isinstance(item, date) else date.fromisoformat(str(item)))
            except ValueError as exc:
                raise ValueError(f"holiday {item!r} is not a date (YYYY-MM-DD)") from exc
        return cls(name, tz, frozenset(WEEKDAYS.index(d) for d in days), frozenset(parsed))

    def is_working_day(self, day: date) -> bool:
        return day.weekday() in self.workdays and day not in self.holidays

    def deadline(self, start_ms: int, duration: Duration) -> int:
        """The moment ``duration`` after ``start_ms`` on this calendar (epoch ms)."""
        if not duration.working_days:
            return start_ms + duration.ms
        return _working_deadline(self, start_ms, duration.working_days)

    def _working_deadline(self, start_ms: int, working_days: float) -> int:
        duration = Duration(working_days=working_days)
        zone = ZoneInfo(self.timezone)
        local = datetime.fromtimestamp(start_ms / 1000, zone)
        if not self.is_working_day(local.date()):
            local = datetime.combine(self._next_working_day(local.date()), datetime.min.time(), zone)
        whole = int(duration.working_days)
        day = local.date()
        for _ in range(whole):
            day = self._next_working_day(day)
        end = datetime.combine(day, local.time(), zone)
        fraction = duration.working_days - whole
        end_ms = int(end.astimezone(UTC).timestamp() * 1000) + int(fraction * DAY_MS)
        return end_ms

    def _next_working_day(self, day: date) -> date:
        """The working day after ``day``."""
        if not self.workdays:
            raise ValueError(f"calendar {self.name!r} has no working days")
        day += timedelta(days=1)
        while not self.is_working_day(day):
            day += timedelta(days=1)
        return day


@functools.lru_cache(maxsize=1 << 16)
def _working_deadline(calendar: BusinessCalendar, start_ms: int, working_days: float) -> int:
    """Memoised: rules ask for the same deadline at every evaluation until the clock restarts."""
    return calendar._working_deadline(start_ms, working_days)
