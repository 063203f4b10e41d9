"""Calendars: named sets of days and time windows that schedules skip or keep to.

Declared once in the server config and referenced by schedule triggers
(`exclude: [month-end-close]`, `only_within: [maintenance-window]`)::

    calendars:
      month-end-close:
        timezone: America/New_York
        last_business_days: 2            # the last 2 business days of every month
        holidays: [us-holidays]          # days of these calendars are not business days
        dates: [2026-12-31]
        ranges: [{from: 2026-12-24, to: 2027-01-01}]
      maintenance-window:
        timezone: Europe/Berlin
        windows: [{cron: "0 2 * * SAT", duration: 4h}]   # Saturdays 02:00-06:00
      us-holidays:
        dates: [2026-11-26, 2026-12-25, 2027-01-01]

Rules:

* An instant is in a calendar if any of its entries matches it; every entry is read
  in the calendar's own `timezone` (a day is a local calendar day there).
* `dates` are whole days; `ranges` run from the start of `from` to the end of `to`
  when both are dates, or over [from, to) when they are date-times.
* `weekdays` are whole days of the week (MON..SUN).
* Business days are Monday to Friday, minus the days of the `holidays` calendars.
  `first_business_days: N` / `last_business_days: N` are the first / last N of them
  in each month.
* `windows` open at each fire of a cron expression and stay open for `duration`.
* A calendar named in `holidays` may only list days (`dates`, `ranges`, `weekdays`),
  so holiday lookups never recurse.

Everything here is pure: the instant comes in as Unix seconds.
"""

from __future__ import annotations

import calendar as _calendar
import math
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

from cronsim import CronSim
from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.definitions.cron import CronText, DayOrInstant, TimeZoneName, cron_expression, zone
from server.definitions.models import Duration

WEEKDAYS = ("MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN")
CALENDAR_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DateRange(_Model):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    start: DayOrInstant = Field(alias="from")
    end: DayOrInstant = Field(alias="to")

    @model_validator(mode="after")
    def _ordered(self) -> DateRange:
        if type(self.start) is not type(self.end):
            raise ValueError("`from` and `to` must both be dates or both be date-times")
        if any(isinstance(b, datetime) and b.tzinfo is not None for b in (self.start, self.end)):
            raise ValueError("write range date-times without an offset: they are read in the calendar's timezone")
        if self.end < self.start:
            raise ValueError(f"range ends ({self.end}) before it starts ({self.start})")
        return self


class Window(_Model):
    cron: CronText
    duration: Annotated[Duration, Field(gt=0)]


class CalendarSpec(_Model):
    """One named calendar (see the module docstring)."""

    timezone: TimeZoneName = "UTC"
    description: str = ""
    dates: list[date] = []
    ranges: list[DateRange] = []
    weekdays: list[Literal["MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN"]] = []
    first_business_days: Annotated[int, Field(ge=1, le=23)] | None = None
    last_business_days: Annotated[int, Field(ge=1, le=23)] | None = None
    holidays: list[Annotated[str, Field(pattern=CALENDAR_NAME)]] = []
    windows: list[Window] = []

    @model_validator(mode="after")
    def _not_empty(self) -> CalendarSpec:
        if not (self.dates or self.ranges or self.weekdays or self.first_business_days
                or self.last_business_days or self.windows):
            raise ValueError("a calendar needs at least one of dates, ranges, weekdays, "
                             "first_business_days, last_business_days, windows")
        if self.holidays and not (self.first_business_days or self.last_business_days):
            raise ValueError("holidays only matter with first_business_days or last_business_days")
        return self

    @property
    def days_only(self) -> bool:
        return not (self.first_business_days or self.last_business_days or self.windows)


def check_calendars(specs: dict[str, CalendarSpec]) -> dict[str, CalendarSpec]:
    """Names are well-formed and every `holidays` entry names a days-only calendar."""
    import re

    for name, spec in specs.items():
        if not re.match(CALENDAR_NAME, name):
            raise ValueError(f"calendar name {name!r} must be letters, digits, '_', '.', '-' (at most 64)")
        for other in spec.holidays:
            if other not in specs:
                known = ", ".join(sorted(specs)) or "none"
                raise ValueError(f"calendar {name!r}: holidays names unknown calendar {other!r} (known: {known})")
            if not specs[other].days_only:
                raise ValueError(f"calendar {name!r}: holidays calendar {other!r} may only list dates, ranges and weekdays")
    return specs


# ------------------------------------------------------------------ compiled


@dataclass(frozen=True)
class Calendar:
    name: str
    spec: CalendarSpec
    tz: ZoneInfo
    holiday_calendars: tuple[Calendar, ...] = ()
    _windows: tuple[tuple[str, float], ...] = field(default=())

    def why(self, ts: float) -> str | None:
        """Why the instant is in this calendar (the first entry that matches), or None."""
        local = datetime.fromtimestamp(ts, self.tz)
        day = local.date()
        spec = self.spec
        if day in spec.dates:
            return f"{day} is listed"
        for r in spec.ranges:
            if isinstance(r.start, datetime):
                start, end = r.start.replace(tzinfo=self.tz), r.end.replace(tzinfo=self.tz)
                if start.timestamp() <= ts < end.timestamp():
                    return f"within {r.start.isoformat()} to {r.end.isoformat()}"
            elif r.start <= day <= r.end:
                return f"{day} is within {r.start} to {r.end}"
        if spec.weekdays and WEEKDAYS[day.weekday()] in spec.weekdays:
            return f"{day} is a {_calendar.day_name[day.weekday()]}"
        for n, first in ((spec.first_business_days, True), (spec.last_business_days, False)):
            if n and day in self._business_edge(day.year, day.month, n, first):
                which = "first" if first else "last"
                month = _calendar.month_name[day.month]
                if n == 1:
                    return f"{day} is the {which} business day of {month}"
                return f"{day} is one of the {which} {n} business days of {month}"
        for expr, duration_s in self._windows:
            opened = _window_opening(expr, ts, duration_s, self.tz)
            if opened is not None:
                return f"in the window opened {opened.isoformat()} ({expr}, {duration_s:g}s)"
        return None

    def contains(self, ts: float) -> bool:
        return self.why(ts) is not None

    def is_business_day(self, day: date) -> bool:
        if day.weekday() >= 5:
            return False
        return not any(h.contains_day(day) for h in self.holiday_calendars)

    def contains_day(self, day: date) -> bool:
        """For days-only calendars (holidays): is this local day in it?"""
        spec = self.spec
        if day in spec.dates or (spec.weekdays and WEEKDAYS[day.weekday()] in spec.weekdays):
            return True
        for r in spec.ranges:
            start = r.start.date() if isinstance(r.start, datetime) else r.start
            # a date-time range ends before `to`: one ending at midnight leaves that day out
            end = (r.end - timedelta(microseconds=1)).date() if isinstance(r.end, datetime) else r.end
            if start <= day <= end:
                return True
        return False

    def _business_edge(self, year: int, month: int, n: int, first: bool) -> list[date]:
        days_in_month = _calendar.monthrange(year, month)[1]
        order = range(1, days_in_month + 1) if first else range(days_in_month, 0, -1)
        found: list[date] = []
        for d in order:
            day = date(year, month, d)
            if self.is_business_day(day):
                found.append(day)
                if len(found) == n:
                    break
        return found


def _window_opening(expr: str, ts: float, duration_s: float, tz: ZoneInfo) -> datetime | None:
    """A window open at `ts` opened in (ts - duration, ts]: the first such opening, or None."""
    # Forward from the instant (not back from local wall time): aware arithmetic drops
    # `fold`, and Debian's fixed-time rule walks wall time, so in the second pass of a
    # repeated hour a reverse walk lands an hour off. cronsim starts at whole seconds and
    # may yield a fire at or before its start there; skip those.
    after = ts - duration_s
    for opened in CronSim(expr, datetime.fromtimestamp(math.floor(after), tz)):
        at = opened.timestamp()
        if at > after:
            return opened if at <= ts else None
    return None


def compile_calendars(specs: dict[str, CalendarSpec]) -> dict[str, Calendar]:
    check_calendars(specs)
    days_only = {name: Calendar(name, spec, zone(spec.timezone)) for name, spec in specs.items() if spec.days_only}
    compiled: dict[str, Calendar] = {}
    for name, spec in specs.items():
        compiled[name] = Calendar(
            name, spec, zone(spec.timezone),
            holiday_calendars=tuple(days_only[h] for h in spec.holidays),
            _windows=tuple((cron_expression(w.cron), w.duration) for w in spec.windows),
        )
    return compiled


def describe(spec: CalendarSpec) -> list[str]:
    """The calendar's entries in words, for the API and `baton schedules`."""
    parts: list[str] = []
    if spec.dates:
        parts.append("dates " + ", ".join(str(d) for d in spec.dates))
    parts += [f"{r.start} to {r.end}" for r in spec.ranges]
    if spec.weekdays:
        parts.append("every " + ", ".join(spec.weekdays))
    if spec.first_business_days:
        parts.append(f"first {spec.first_business_days} business days of the month")
    if spec.last_business_days:
        parts.append(f"last {spec.last_business_days} business days of the month")
    parts += [f"{w.cron} for {w.duration:g}s" for w in spec.windows]
    return parts


def as_dict(spec: CalendarSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json", by_alias=True, exclude_defaults=True)
