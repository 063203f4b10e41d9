"""Calendars (server/definitions/calendars.py): which instants they contain, why, and
the config errors that keep a bad calendar out of the server.

Pure: instants are Unix seconds built from literal dates; every entry is read in the
calendar's own time zone.
"""

from __future__ import annotations

from datetime import date, datetime, timezone
from zoneinfo import ZoneInfo

import pytest

from server.definitions.calendars import CalendarSpec, as_dict, compile_calendars, describe
from server.errors import ConfigError
from server.settings import load_settings

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


@pytest.fixture
def no_repository_config(tmp_path, monkeypatch):
    # load_settings merges config/baton.yaml (or BATON_CONFIG): calendars configured
    # there would join the ones a test passes
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BATON_CONFIG", raising=False)


def calendars(**specs: dict):
    return compile_calendars({name.replace("_", "-"): CalendarSpec(**spec) for name, spec in specs.items()})


def at(tz, *fields: int, fold: int = 0) -> float:
    return datetime(*fields, tzinfo=tz, fold=fold).timestamp()


def why_by_day(cal, tz, days: list[tuple[int, int, int]], hour: int = 12) -> list[str | None]:
    return [cal.why(at(tz, *day, hour)) for day in days]


# --------------------------------------------------------------------- days


def test_dates_are_whole_local_days():
    cal = calendars(close={"dates": [date(2026, 12, 31), "2026-06-30"]})["close"]
    assert cal.why(at(UTC, 2026, 12, 31, 0, 0)) == "2026-12-31 is listed"
    assert cal.why(at(UTC, 2026, 12, 31, 23, 59, 59)) == "2026-12-31 is listed"
    assert cal.why(at(UTC, 2026, 6, 30, 12)) == "2026-06-30 is listed"
    assert cal.why(at(UTC, 2026, 12, 30, 23, 59, 59)) is None
    assert cal.why(at(UTC, 2027, 1, 1)) is None
    assert cal.contains(at(UTC, 2026, 12, 31, 8)) and not cal.contains(at(UTC, 2027, 1, 1, 8))


def test_date_ranges_include_both_days():
    cal = calendars(freeze={"ranges": [{"from": "2026-12-24", "to": date(2027, 1, 1)}]})["freeze"]
    assert cal.why(at(UTC, 2026, 12, 24, 0)) == "2026-12-24 is within 2026-12-24 to 2027-01-01"
    assert cal.why(at(UTC, 2027, 1, 1, 23, 59)) == "2027-01-01 is within 2026-12-24 to 2027-01-01"
    assert cal.why(at(UTC, 2026, 12, 23, 23, 59, 59)) is None
    assert cal.why(at(UTC, 2027, 1, 2, 0)) is None


def test_date_time_ranges_are_half_open():
    cal = calendars(release={"timezone": "Europe/Berlin",
                             "ranges": [{"from": "2026-03-01T10:00", "to": datetime(2026, 3, 1, 12)}]})["release"]
    within = "within 2026-03-01T10:00:00 to 2026-03-01T12:00:00"
    assert cal.why(at(BERLIN, 2026, 3, 1, 10)) == within
    assert cal.why(at(BERLIN, 2026, 3, 1, 11, 59, 59)) == within
    assert cal.why(at(BERLIN, 2026, 3, 1, 12)) is None
    assert cal.why(at(BERLIN, 2026, 3, 1, 9, 59, 59)) is None
    assert cal.why(at(UTC, 2026, 3, 1, 9)) == within  # 10:00 in Berlin


def test_a_midnight_to_midnight_range_is_read_as_date_times():
    # "2026-03-01T00:00:00" has a time: the range is [midnight, next midnight), one day,
    # not the two whole days `2026-03-01 to 2026-03-02` would be
    cal = calendars(one_day={"ranges": [{"from": "2026-03-01T00:00:00", "to": "2026-03-02T00:00:00"}]})["one-day"]
    assert cal.contains(at(UTC, 2026, 3, 1, 23, 59))
    assert not cal.contains(at(UTC, 2026, 3, 2, 12))


def test_weekdays():
    cal = calendars(weekend={"weekdays": ["SAT", "SUN"]})["weekend"]
    assert why_by_day(cal, UTC, [(2026, 3, 13), (2026, 3, 14), (2026, 3, 15), (2026, 3, 16)]) == [
        None, "2026-03-14 is a Saturday", "2026-03-15 is a Sunday", None]


# ------------------------------------------------------------- business days

HOLIDAYS = {
    "us_holidays": {"dates": ["2026-11-26", "2026-12-25", "2027-01-01"]},
    "year_end": {"ranges": [{"from": "2026-12-24", "to": "2027-01-01"}]},
    "fridays_off": {"weekdays": ["FRI"]},
    "half_day": {"ranges": [{"from": "2026-04-29T00:00:00", "to": "2026-04-30T00:00:00"}]},
}

BUSINESS_TABLE = [
    # spec, days asked (at noon, UTC), expected answers
    ({"first_business_days": 2}, [(2026, 3, 1), (2026, 3, 2), (2026, 3, 3), (2026, 3, 4)],
     [None, "2026-03-02 is one of the first 2 business days of March",
      "2026-03-03 is one of the first 2 business days of March", None]),
    ({"last_business_days": 2}, [(2026, 3, 27), (2026, 3, 30), (2026, 3, 31)],
     [None, "2026-03-30 is one of the last 2 business days of March",
      "2026-03-31 is one of the last 2 business days of March"]),
    # May 2026 ends on a weekend: its last business day is Friday the 29th
    ({"last_business_days": 1}, [(2026, 5, 28), (2026, 5, 29), (2026, 5, 30), (2026, 5, 31)],
     [None, "2026-05-29 is the last business day of May", None, None]),
    # holidays are not business days: the month's last weekdays are holidays
    ({"last_business_days": 1, "holidays": ["year-end"]}, [(2026, 12, 23), (2026, 12, 31)],
     ["2026-12-23 is the last business day of December", None]),
    ({"last_business_days": 1, "holidays": ["us-holidays", "fridays-off"]}, [(2026, 5, 28), (2026, 5, 29)],
     ["2026-05-28 is the last business day of May", None]),
    ({"first_business_days": 1, "holidays": ["us-holidays"]}, [(2027, 1, 1), (2027, 1, 4)],
     [None, "2027-01-04 is the first business day of January"]),
    # Thanksgiving (26th) is not one of November's last 3 business days: 25th, 27th, 30th are
    ({"last_business_days": 3, "holidays": ["us-holidays"]}, [(2026, 11, 24), (2026, 11, 25), (2026, 11, 26), (2026, 11, 27)],
     [None, "2026-11-25 is one of the last 3 business days of November", None,
      "2026-11-27 is one of the last 3 business days of November"]),
    # a date-time holiday ending at midnight leaves the next day a business day
    ({"last_business_days": 1, "holidays": ["half-day"]}, [(2026, 4, 29), (2026, 4, 30)],
     [None, "2026-04-30 is the last business day of April"]),
    ({"first_business_days": 1, "last_business_days": 1}, [(2026, 4, 1), (2026, 4, 15), (2026, 4, 30)],
     ["2026-04-01 is the first business day of April", None, "2026-04-30 is the last business day of April"]),
]


@pytest.mark.parametrize("spec, days, expected", BUSINESS_TABLE)
def test_first_and_last_business_days(spec, days, expected):
    cal = calendars(**HOLIDAYS, edge=spec)["edge"]
    assert why_by_day(cal, UTC, days) == expected


def test_business_days_skip_holidays():
    cal = calendars(**HOLIDAYS, edge={"last_business_days": 1, "holidays": ["us-holidays"]})["edge"]
    assert [cal.is_business_day(date(2026, 11, d)) for d in (25, 26, 27, 28)] == [True, False, True, False]


# --------------------------------------------------------------------- windows


def test_a_window_is_open_from_its_cron_fire_for_its_duration():
    cal = calendars(maintenance={"timezone": "Europe/Berlin",
                                 "windows": [{"cron": "0 2 * * SAT", "duration": "4h"}]})["maintenance"]
    opened = "in the window opened 2026-03-07T02:00:00+01:00 (0 2 * * SAT, 14400s)"
    assert cal.why(at(BERLIN, 2026, 3, 7, 1, 59, 59)) is None
    assert cal.why(at(BERLIN, 2026, 3, 7, 2)) == opened  # at opening
    assert cal.why(at(BERLIN, 2026, 3, 7, 4, 30)) == opened
    assert cal.why(at(BERLIN, 2026, 3, 7, 5, 59, 59)) == opened
    assert cal.why(at(BERLIN, 2026, 3, 7, 6)) is None  # at closing
    assert cal.why(at(BERLIN, 2026, 3, 8, 3)) is None  # a Sunday
    assert cal.why(at(UTC, 2026, 3, 7, 1, 30)) == opened  # 02:30 in Berlin


def test_a_window_longer_than_a_day_and_several_windows():
    cal = calendars(w={"windows": [{"cron": "0 22 * * FRI", "duration": "2d10h"}, {"cron": "0 12 * * *", "duration": "1h"}]})["w"]
    weekend = "in the window opened 2026-03-13T22:00:00+00:00 (0 22 * * FRI, 208800s)"
    assert cal.why(at(UTC, 2026, 3, 15, 12, 30)) == weekend  # the first window that matches names the reason
    assert cal.why(at(UTC, 2026, 3, 16, 7, 59)) == weekend
    assert cal.why(at(UTC, 2026, 3, 16, 8)) is None
    assert cal.why(at(UTC, 2026, 3, 16, 12, 30)) == "in the window opened 2026-03-16T12:00:00+00:00 (0 12 * * *, 3600s)"


@pytest.mark.parametrize("expr, duration, instant, opened", [
    # the second pass of the repeated hour: opened by the */30 fire of that pass
    ("*/30 * * * *", "10m", (2026, 11, 1, 1, 5, 1), "2026-11-01T01:00:00-05:00"),
    ("*/30 * * * *", "10m", (2026, 11, 1, 1, 5, 0), "2026-11-01T01:00:00-04:00"),
    ("*/30 * * * *", "10m", (2026, 11, 1, 1, 15, 1), None),
    # a fixed-time window opens once, at the first 01:30; real time runs on through the second pass
    ("30 1 * * *", "1h", (2026, 11, 1, 1, 20, 1), "2026-11-01T01:30:00-04:00"),
    ("30 1 * * *", "1h", (2026, 11, 1, 1, 35, 1), None),
    # a window opening in the skipped hour opens at its end
    ("30 2 * * *", "1h", (2026, 3, 8, 3, 30, 0), "2026-03-08T03:00:00-04:00"),
    ("30 2 * * *", "1h", (2026, 3, 8, 4, 0, 0), None),
    ("30 2 * * *", "1h", (2026, 3, 8, 1, 59, 0), None),
])
def test_windows_across_dst(expr, duration, instant, opened):
    *fields, fold = instant
    cal = calendars(w={"timezone": "America/New_York", "windows": [{"cron": expr, "duration": duration}]})["w"]
    why = cal.why(at(NEW_YORK, *fields, fold=fold))
    assert (why.split(" ")[4] if why else None) == opened


# ------------------------------------------------------------------- time zones


def test_entries_are_read_in_the_calendars_time_zone():
    # 2026-05-01T02:00Z is still 30 April (22:00) in New York, the last business day there
    instant = at(UTC, 2026, 5, 1, 2)
    spec = {"last_business_days": 1, "dates": ["2026-04-30"]}
    new_york = calendars(ny={**spec, "timezone": "America/New_York"})["ny"]
    in_utc = calendars(utc=spec)["utc"]
    assert new_york.why(instant) == "2026-04-30 is listed"
    assert in_utc.why(instant) is None
    month_end = calendars(ny={"last_business_days": 1, "timezone": "America/New_York"})["ny"]
    assert month_end.why(instant) == "2026-04-30 is the last business day of April"
    assert calendars(utc={"last_business_days": 1})["utc"].why(instant) is None
    first = calendars(utc={"first_business_days": 1})["utc"]
    assert first.why(instant) == "2026-05-01 is the first business day of May"
    weekday = calendars(ny={"weekdays": ["THU"], "timezone": "America/New_York"})["ny"]
    assert weekday.why(instant) == "2026-04-30 is a Thursday"


def test_a_holidays_calendar_is_read_in_the_days_of_the_calendar_using_it():
    cals = calendars(hol={"dates": ["2026-04-30"], "timezone": "Asia/Tokyo"},
                     ny={"last_business_days": 1, "holidays": ["hol"], "timezone": "America/New_York"})
    assert cals["ny"].why(at(NEW_YORK, 2026, 4, 29, 12)) == "2026-04-29 is the last business day of April"


# -------------------------------------------------------------- config errors


@pytest.mark.parametrize("specs, message", [
    ({"x": {"last_business_days": 1, "holidays": ["nope"]}},
     "calendars: calendar 'x': holidays names unknown calendar 'nope' (known: x)"),
    ({"x": {"last_business_days": 1, "holidays": ["y"]}, "y": {"windows": [{"cron": "0 2 * * *", "duration": "1h"}]}},
     "calendar 'x': holidays calendar 'y' may only list dates, ranges and weekdays"),
    ({"x": {"last_business_days": 1, "holidays": ["x"]}}, "holidays calendar 'x' may only list dates"),
    ({"x": {}}, "calendars.x: Value error, a calendar needs at least one of dates, ranges, weekdays"),
    ({"x": {"timezone": "Europe/Berlin", "description": "empty"}}, "a calendar needs at least one of"),
    ({"x": {"dates": ["2026-01-01"], "holidays": ["y"]}, "y": {"dates": ["2026-01-02"]}},
     "holidays only matter with first_business_days or last_business_days"),
    ({"x": {"windows": [{"cron": "0 25 * * *", "duration": "1h"}]}},
     "calendars.x.windows.0.cron: Value error, invalid cron expression '0 25 * * *': Bad hour"),
    ({"x": {"windows": [{"cron": "0 2 * * *", "duration": 0}]}}, "calendars.x.windows.0.duration"),
    ({"x": {"windows": [{"cron": "0 2 * * *"}]}}, "calendars.x.windows.0.duration: Field required"),
    ({"x": {"ranges": [{"from": "2026-03-02", "to": "2026-03-01"}]}},
     "calendars.x.ranges.0: Value error, range ends (2026-03-01) before it starts (2026-03-02)"),
    ({"x": {"ranges": [{"from": "2026-03-01T12:00", "to": "2026-03-01T11:00"}]}},
     "range ends (2026-03-01 11:00:00) before it starts (2026-03-01 12:00:00)"),
    ({"x": {"ranges": [{"from": "2026-03-01", "to": "2026-03-02T11:00"}]}},
     "`from` and `to` must both be dates or both be date-times"),
    ({"x": {"ranges": [{"from": "2026-03-01T10:00", "to": "2026-03-01T12:00+01:00"}]}},
     "write range date-times without an offset"),
    ({"x": {"ranges": [{"from": "2026-03-01T10:00Z", "to": "2026-03-01T12:00"}]}},
     "write range date-times without an offset"),
    ({"x": {"ranges": [{"from": "2026-03-01"}]}}, "calendars.x.ranges.0.to: Field required"),
    ({"x": {"timezone": "Mars/Olympus", "dates": ["2026-01-01"]}},
     "calendars.x.timezone: Value error, unknown time zone 'Mars/Olympus': use an IANA name"),
    ({"x": {"weekdays": ["MONDAY"]}}, "calendars.x.weekdays.0"),
    ({"x": {"first_business_days": 0}}, "calendars.x.first_business_days"),
    ({"x": {"last_business_days": 24}}, "calendars.x.last_business_days"),
    ({"x": {"dates": ["2026-02-30"]}}, "calendars.x.dates.0"),
    ({"x": {"dates": ["2026-01-01"], "days": ["MON"]}}, "calendars.x.days: Extra inputs are not permitted"),
    ({"bad name!": {"dates": ["2026-01-01"]}}, "calendar name 'bad name!' must be letters, digits"),
])
def test_config_errors_name_the_problem(specs, message, no_repository_config):
    with pytest.raises(ConfigError) as info:
        load_settings(calendars=specs)
    assert message in str(info.value)


def test_calendars_load_from_settings(no_repository_config):
    settings = load_settings(calendars={
        "us-holidays": {"dates": ["2026-11-26", date(2026, 12, 25)]},
        "month-end-close": {"timezone": "America/New_York", "last_business_days": 2, "holidays": ["us-holidays"],
                            "ranges": [{"from": "2026-12-24", "to": "2027-01-01"}]},
        "maintenance-window": {"timezone": "Europe/Berlin", "windows": [{"cron": "0 2 * * SAT", "duration": "4h"}]},
    })
    compiled = compile_calendars(settings.calendars)
    assert sorted(compiled) == ["maintenance-window", "month-end-close", "us-holidays"]
    assert [h.name for h in compiled["month-end-close"].holiday_calendars] == ["us-holidays"]
    assert compiled["month-end-close"].why(at(NEW_YORK, 2026, 11, 30, 9)) == (
        "2026-11-30 is one of the last 2 business days of November")
    assert load_settings().calendars == {}


def test_describe_and_as_dict():
    spec = CalendarSpec(timezone="America/New_York", dates=["2026-12-31"], weekdays=["SAT", "SUN"],
                        ranges=[{"from": "2026-12-24", "to": "2027-01-01"}], first_business_days=1,
                        last_business_days=2, windows=[{"cron": "0 2 * * SAT", "duration": "4h"}])
    assert describe(spec) == ["dates 2026-12-31", "2026-12-24 to 2027-01-01", "every SAT, SUN",
                              "first 1 business days of the month", "last 2 business days of the month",
                              "0 2 * * SAT for 14400s"]
    assert as_dict(spec) == {
        "timezone": "America/New_York", "dates": ["2026-12-31"], "weekdays": ["SAT", "SUN"],
        "ranges": [{"from": "2026-12-24", "to": "2027-01-01"}], "first_business_days": 1,
        "last_business_days": 2, "windows": [{"cron": "0 2 * * SAT", "duration": 14400.0}]}
    assert CalendarSpec(**as_dict(spec)) == spec
