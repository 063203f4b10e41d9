"""Compiled schedules (server/triggers/schedules.py): fire times across DST, interval
arithmetic, calendars, missed fires, and what a fire hands its run.

Pure: instants are Unix seconds built from literal dates, nothing waits and nothing
reads a clock. Expected fire times are written as UTC instants, so a test pins the
real moment a run starts, not only the wall-clock text.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timezone
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from server.definitions.calendars import CalendarSpec, compile_calendars
from server.definitions.models import CronTrigger, EveryTrigger, Trigger
from server.errors import ConfigError, ExpressionError
from server.settings import load_settings
from server.triggers import schedules
from server.triggers.schedules import (
    FIRE_EVENT_TYPE, MAX_RECORDED_MISSED, Fire, Schedule, ScheduleError, compile_schedule, describe, plan_fires,
    schedule_name,
)

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0


def schedule(calendars: dict | None = None, *, name: str = "nightly", workflow: str = "wf", index: int = 0,
             **spec) -> Schedule:
    model = CronTrigger(**spec) if "schedule" in spec else EveryTrigger(**spec)
    compiled = compile_calendars({k: CalendarSpec(**v) for k, v in (calendars or {}).items()})
    return compile_schedule(name, workflow, index, model, compiled)


def utc(text: str) -> float:
    """'2026-03-29T01:00Z' as Unix seconds."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def utcs(instants: list[float]) -> list[str]:
    return [datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%MZ") for ts in instants]


def local(tz: ZoneInfo, *fields: int, fold: int = 0) -> float:
    return datetime(*fields, tzinfo=tz, fold=fold).timestamp()


def walk(s: Schedule, after: float, until: float) -> list[float]:
    """Every fire in (after, until], by stepping next_after from one fire to the next."""
    fires: list[float] = []
    fire = s.next_after(after)
    while fire is not None and fire <= until:
        assert fire > (fires[-1] if fires else after), "next_after must move strictly forward"
        fires.append(fire)
        fire = s.next_after(fire)
    return fires


# ------------------------------------------------------------------ cron and DST
#
# 2026: Europe/Berlin springs forward on 29 March (02:00 CET -> 03:00 CEST, at 01:00Z)
# and falls back on 25 October (03:00 CEST -> 02:00 CET, at 01:00Z); America/New_York
# springs forward on 8 March (02:00 EST -> 03:00 EDT, at 07:00Z) and falls back on
# 1 November (02:00 EDT -> 01:00 EST, at 06:00Z).

DST_TABLE = [
    # zone, cron, from (local, exclusive), to (local, inclusive), fires (UTC)
    # spring forward: a fixed time in the gap fires once, at 03:00 local
    (BERLIN, "30 2 * * *", (2026, 3, 28, 12), (2026, 3, 30, 12), ["2026-03-29T01:00Z", "2026-03-30T00:30Z"]),
    (NEW_YORK, "30 2 * * *", (2026, 3, 7, 12), (2026, 3, 9, 12), ["2026-03-08T07:00Z", "2026-03-09T06:30Z"]),
    # fall back: a fixed time in the repeated hour fires once, at its first occurrence; 25 h to the next
    (BERLIN, "30 2 * * *", (2026, 10, 24, 12), (2026, 10, 26, 12), ["2026-10-25T00:30Z", "2026-10-26T01:30Z"]),
    (NEW_YORK, "30 1 * * *", (2026, 10, 31, 12), (2026, 11, 2, 12), ["2026-11-01T05:30Z", "2026-11-02T06:30Z"]),
    # hour wildcards follow real time: nothing invented in the gap...
    (BERLIN, "0 * * * *", (2026, 3, 29, 0, 30), (2026, 3, 29, 4, 30),
     ["2026-03-29T00:00Z", "2026-03-29T01:00Z", "2026-03-29T02:00Z"]),
    (NEW_YORK, "0 * * * *", (2026, 3, 8, 0, 30), (2026, 3, 8, 4, 30),
     ["2026-03-08T06:00Z", "2026-03-08T07:00Z", "2026-03-08T08:00Z"]),
    (BERLIN, "*/30 * * * *", (2026, 3, 29, 0, 45), (2026, 3, 29, 3, 45),
     ["2026-03-29T00:00Z", "2026-03-29T00:30Z", "2026-03-29T01:00Z", "2026-03-29T01:30Z"]),
    (NEW_YORK, "*/30 * * * *", (2026, 3, 8, 0, 45), (2026, 3, 8, 3, 45),
     ["2026-03-08T06:00Z", "2026-03-08T06:30Z", "2026-03-08T07:00Z", "2026-03-08T07:30Z"]),
    # ...and both passes of the repeated hour fire
    (BERLIN, "0 * * * *", (2026, 10, 25, 0, 30), (2026, 10, 25, 4, 30),
     ["2026-10-24T23:00Z", "2026-10-25T00:00Z", "2026-10-25T01:00Z", "2026-10-25T02:00Z", "2026-10-25T03:00Z"]),
    (NEW_YORK, "0 * * * *", (2026, 11, 1, 0, 30), (2026, 11, 1, 3, 30),
     ["2026-11-01T05:00Z", "2026-11-01T06:00Z", "2026-11-01T07:00Z", "2026-11-01T08:00Z"]),
    (BERLIN, "*/30 * * * *", (2026, 10, 25, 1, 45), (2026, 10, 25, 3, 15),
     ["2026-10-25T00:00Z", "2026-10-25T00:30Z", "2026-10-25T01:00Z", "2026-10-25T01:30Z", "2026-10-25T02:00Z"]),
    (NEW_YORK, "*/30 * * * *", (2026, 11, 1, 0, 45), (2026, 11, 1, 2, 15),
     ["2026-11-01T05:00Z", "2026-11-01T05:30Z", "2026-11-01T06:00Z", "2026-11-01T06:30Z", "2026-11-01T07:00Z"]),
]


@pytest.mark.parametrize("tz, expr, start, end, expected", DST_TABLE)
def test_cron_fires_across_dst(tz, expr, start, end, expected):
    s = schedule(schedule=expr, timezone=tz.key)
    after, until = local(tz, *start), local(tz, *end)
    fires = walk(s, after, until)
    assert utcs(fires) == expected
    # the enumeration used after an outage finds the same fires, none doubled or lost
    assert s.due(fires[0], until, keep=100) == (fires, 0)
    assert s.upcoming(after, len(expected)) == fires


@pytest.mark.parametrize("tz, expr, day, first_local", [
    (BERLIN, "30 2 * * *", (2026, 3, 29), "2026-03-29T03:00:00+02:00"),
    (NEW_YORK, "30 2 * * *", (2026, 3, 8), "2026-03-08T03:00:00-04:00"),
])
def test_a_time_in_the_skipped_hour_fires_once_at_the_end_of_the_gap(tz, expr, day, first_local):
    s = schedule(schedule=expr, timezone=tz.key)
    fires = walk(s, local(tz, *day), local(tz, *day, 23, 59))
    assert [datetime.fromtimestamp(f, tz).isoformat() for f in fires] == [first_local]
    # the day before and the day after, 02:30 exists and is kept
    before, after = s.next_after(local(tz, *day) - DAY), s.next_after(fires[0])
    assert datetime.fromtimestamp(before, tz).strftime("%H:%M") == "02:30"
    assert datetime.fromtimestamp(after, tz).strftime("%H:%M") == "02:30"
    assert fires[0] - before == after - fires[0] == 23.5 * HOUR


@pytest.mark.parametrize("tz, expr, day", [
    (BERLIN, "30 2 * * *", (2026, 10, 25)),
    (NEW_YORK, "30 1 * * *", (2026, 11, 1)),
])
def test_a_time_in_the_repeated_hour_fires_once_at_its_first_occurrence(tz, expr, day):
    s = schedule(schedule=expr, timezone=tz.key)
    fires = walk(s, local(tz, *day), local(tz, *day, 23, 59))
    hour = int(expr.split()[1])
    assert fires == [local(tz, *day, hour, 30, fold=0)]
    assert s.next_after(fires[0]) - fires[0] == 25 * HOUR


# Start anywhere in the transition days (both passes of the repeated hour included):
# next_after is strictly later and is exactly the next fire of the whole walk.
AGREEMENT_CASES = [
    (tz, expr, day)
    for tz, days in ((BERLIN, ((2026, 3, 29), (2026, 10, 25))), (NEW_YORK, ((2026, 3, 8), (2026, 11, 1))))
    for day in days
    for expr in ("30 2 * * *", "30 1 * * *", "0 * * * *", "*/30 * * * *", "15 1-3 * * *", "*/20 1 * * *", "0 0 * * *")
]


@pytest.mark.parametrize("tz, expr, day", AGREEMENT_CASES)
def test_next_after_from_any_instant_agrees_with_the_walk(tz, expr, day):
    s = schedule(schedule=expr, timezone=tz.key)
    begin = local(tz, *day) - DAY
    end = begin + 3 * DAY
    fires = walk(s, begin, end)
    assert len(set(fires)) == len(fires)
    assert s.due(fires[0], end, keep=1000) == (fires, 0)
    for t in range(int(local(tz, *day)), int(local(tz, *day) + DAY), 5 * 60):
        expected = next(f for f in fires if f > t)
        assert s.next_after(t) == expected, datetime.fromtimestamp(t, tz).isoformat()
        assert s.next_after(t + 0.5) == next(f for f in fires if f > t + 0.5)


@pytest.mark.parametrize("tz, expr, inside, expected_next", [
    # an instant in the second pass of the repeated hour, after the first pass's fire
    (NEW_YORK, "30 1 * * *", (2026, 11, 1, 1, 15), "2026-11-02T06:30Z"),
    (NEW_YORK, "30 1 * * *", (2026, 11, 1, 1, 45), "2026-11-02T06:30Z"),
    (BERLIN, "30 2 * * *", (2026, 10, 25, 2, 15), "2026-10-26T01:30Z"),
    (NEW_YORK, "*/30 * * * *", (2026, 11, 1, 1, 15), "2026-11-01T06:30Z"),
    (BERLIN, "0 * * * *", (2026, 10, 25, 2, 15), "2026-10-25T02:00Z"),
])
def test_starting_inside_the_second_pass_of_the_repeated_hour(tz, expr, inside, expected_next):
    s = schedule(schedule=expr, timezone=tz.key)
    t = local(tz, *inside, fold=1)
    assert utcs([s.next_after(t)]) == [expected_next]
    # due() from a fire before the change up to that instant: the first pass only, once
    first = s.next_after(t - DAY)
    fires, earlier = s.due(first, t, keep=1000)
    assert earlier == 0 and fires == walk(s, first - 1, t)
    assert len(set(fires)) == len(fires)


def test_cron_in_utc_and_six_fields():
    s = schedule(schedule="0 19 * * MON-FRI")
    assert utcs(s.upcoming(utc("2026-03-06T12:00Z"), 3)) == ["2026-03-06T19:00Z", "2026-03-09T19:00Z", "2026-03-10T19:00Z"]
    every_ten_s = schedule(schedule="*/10 * * * * *")
    assert every_ten_s.upcoming(utc("2026-03-06T12:00Z") + 0.5, 2) == [utc("2026-03-06T12:00Z") + 10, utc("2026-03-06T12:00Z") + 20]


# ---------------------------------------------------------------- start and end


@pytest.mark.parametrize("spec, after, expected", [
    # start is inclusive when it is itself a fire time (cron and every)
    ({"schedule": "0 9 * * *", "start": datetime(2026, 3, 1, 9)}, 0.0, "2026-03-01T09:00Z"),
    ({"schedule": "0 9 * * *", "start": "2026-03-01T09:00:00"}, 0.0, "2026-03-01T09:00Z"),
    ({"schedule": "0 9 * * *", "start": "2026-03-01T09:00:00.500"}, 0.0, "2026-03-02T09:00Z"),
    ({"schedule": "0 9 * * *", "start": date(2026, 3, 1), "timezone": "Europe/Berlin"}, 0.0, "2026-03-01T08:00Z"),
    ({"schedule": "0 9 * * *", "start": datetime(2026, 3, 1, 9)}, utc("2026-03-05T10:00Z"), "2026-03-06T09:00Z"),
    ({"interval": "1h", "start": datetime(2026, 3, 1, 9, 17)}, 0.0, "2026-03-01T09:17Z"),
    ({"interval": "1h", "start": datetime(2026, 3, 1, 9, 17), "timezone": "America/New_York"}, 0.0,
     "2026-03-01T14:17Z"),
])
def test_start_bounds_the_first_fire(spec, after, expected):
    assert utcs([schedule(**spec).next_after(after)]) == [expected]


@pytest.mark.parametrize("spec, fires", [
    # a date end includes that whole day in the schedule's zone
    ({"interval": "6h", "start": date(2026, 3, 10), "end": date(2026, 3, 10), "timezone": "America/New_York"},
     ["2026-03-10T04:00Z", "2026-03-10T10:00Z", "2026-03-10T16:00Z", "2026-03-10T22:00Z"]),
    ({"schedule": "0 23 * * *", "start": date(2026, 3, 9), "end": date(2026, 3, 10), "timezone": "America/New_York"},
     ["2026-03-10T03:00Z", "2026-03-11T03:00Z"]),
    # a date-time end is inclusive
    ({"interval": "6h", "start": datetime(2026, 3, 10), "end": datetime(2026, 3, 10, 18)},
     ["2026-03-10T00:00Z", "2026-03-10T06:00Z", "2026-03-10T12:00Z", "2026-03-10T18:00Z"]),
    ({"schedule": "0 */6 * * *", "start": datetime(2026, 3, 10), "end": datetime(2026, 3, 10, 18)},
     ["2026-03-10T00:00Z", "2026-03-10T06:00Z", "2026-03-10T12:00Z", "2026-03-10T18:00Z"]),
])
def test_end_bounds_the_last_fire(spec, fires):
    s = schedule(**spec)
    assert utcs(s.upcoming(0.0, 10)) == fires
    assert s.next_after(utc(fires[-1])) is None
    assert utcs(s.due(utc(fires[0]), utc("2027-01-01T00:00Z"), keep=10)[0]) == fires


# ------------------------------------------------------------------------ every


def test_every_is_aligned_to_the_epoch_by_default():
    s = schedule(interval="15m")
    assert utcs(s.upcoming(utc("2026-03-10T10:07Z") + 30, 5)) == [
        "2026-03-10T10:15Z", "2026-03-10T10:30Z", "2026-03-10T10:45Z", "2026-03-10T11:00Z", "2026-03-10T11:15Z"]
    assert s.next_after(utc("2026-03-10T10:15Z")) == utc("2026-03-10T10:30Z")  # strictly after


def test_every_is_aligned_to_start():
    s = schedule(interval="15m", start=datetime(2026, 3, 10, 10, 7))
    assert utcs(s.upcoming(0.0, 3)) == ["2026-03-10T10:07Z", "2026-03-10T10:22Z", "2026-03-10T10:37Z"]
    assert utcs([s.next_after(utc("2026-03-11T00:00Z"))]) == ["2026-03-11T00:07Z"]


@pytest.mark.parametrize("tz, start", [(BERLIN, (2026, 3, 28, 12)), (BERLIN, (2026, 10, 24, 12)),
                                       (NEW_YORK, (2026, 3, 7, 12)), (NEW_YORK, (2026, 10, 31, 12))])
def test_every_counts_real_seconds_across_dst(tz, start):
    hourly = schedule(interval="1h", timezone=tz.key)
    fires = hourly.upcoming(local(tz, *start), 48)
    assert {b - a for a, b in zip(fires, fires[1:])} == {HOUR}
    daily = schedule(interval="1d", timezone=tz.key, start=datetime(*start))
    days = daily.upcoming(0.0, 3)
    assert [b - a for a, b in zip(days, days[1:])] == [DAY, DAY]
    # so the wall-clock time moves by the hour the zone gained or lost
    assert {datetime.fromtimestamp(d, tz).hour for d in days} in ({12, 13}, {12, 11})


@pytest.mark.parametrize("spec", [
    {"interval": "15m"},
    {"interval": "7s"},
    {"interval": "1100ms", "start": datetime(2026, 1, 1, 0, 0, 0, 300_000)},
    {"interval": "90m", "start": datetime(2026, 3, 28, 23, 59, 59), "timezone": "Europe/Berlin"},
    {"interval": "1d", "end": datetime(2026, 3, 12, 12)},
])
@pytest.mark.parametrize("keep", [1, 7, 10_000])
def test_every_due_arithmetic_matches_walking(spec, keep):
    s = schedule(**spec)
    first = s.next_after(utc("2026-03-01T00:00Z"))
    now = first + 1000 * s.interval_s + 0.25
    walked = walk(s, first - 0.001, now)
    fires, earlier = s.due(first, now, keep)
    assert fires == walked[-keep:]  # the same floats: run ids hash them
    assert earlier == len(walked) - len(fires)
    assert s.due(now + 1, now, keep) == ([], 0)


# -------------------------------------------------------------------- calendars

CALENDARS = {
    "us-holidays": {"dates": ["2026-11-26", "2026-12-25"]},
    "month-end": {"timezone": "America/New_York", "last_business_days": 1, "holidays": ["us-holidays"]},
    "business-hours": {"timezone": "Europe/Berlin", "windows": [{"cron": "0 9 * * MON-FRI", "duration": "8h"}]},
}


def test_an_excluded_fire_is_skipped_with_the_calendar_reason():
    s = schedule(CALENDARS, schedule="0 18 * * *", timezone="America/New_York", exclude=["month-end", "us-holidays"])
    assert s.blocked(local(NEW_YORK, 2026, 11, 27, 18)) is None
    assert s.blocked(local(NEW_YORK, 2026, 11, 30, 18)) == (
        "excluded by calendar 'month-end': 2026-11-30 is the last business day of November")
    assert s.blocked(local(NEW_YORK, 2026, 11, 26, 18)) == (
        "excluded by calendar 'us-holidays': 2026-11-26 is listed")


def test_only_within_skips_fires_outside():
    s = schedule(CALENDARS, schedule="0 * * * *", timezone="Europe/Berlin", only_within=["business-hours"])
    assert s.blocked(local(BERLIN, 2026, 3, 10, 9)) is None
    assert s.blocked(local(BERLIN, 2026, 3, 10, 16)) is None
    assert s.blocked(local(BERLIN, 2026, 3, 10, 17)) == "outside calendar 'business-hours'"
    assert s.blocked(local(BERLIN, 2026, 3, 14, 12)) == "outside calendar 'business-hours'"  # a Saturday
    both = schedule(CALENDARS, schedule="0 * * * *", only_within=["business-hours", "us-holidays"])
    assert both.blocked(utc("2026-12-25T22:00Z")) is None
    assert both.blocked(utc("2026-12-26T22:00Z")) == "outside calendars 'business-hours', 'us-holidays'"


def test_calendars_are_checked_at_the_nominal_time_in_the_plan():
    s = schedule(CALENDARS, schedule="0 18 * * *", timezone="America/New_York", exclude=["month-end"])
    fire = local(NEW_YORK, 2026, 11, 30, 18)
    assert plan_fires(s, [fire], 0, fire + 5, grace_s=60) == [
        Fire(fire, "skip", "excluded by calendar 'month-end': 2026-11-30 is the last business day of November")]


# ------------------------------------------------------------------ missed fires
#
# A `*/5` schedule whose fires at T, T+5m and T+10m were missed (Baton was down), seen
# either at T+11m30s (all three late) or exactly at T+15m (a fourth fire, on time).

T = utc("2026-06-01T10:00Z")
GRACE_S = 60.0
THREE_LATE = T + 11.5 * MINUTE
FOURTH_ON_TIME = T + 15 * MINUTE
SKIP = "missed while Baton was not running (on_missed: skip)"
ONCE_LATEST = "missed; run_once starts only the latest missed fire"
ONCE_NOW = "missed; run_once runs the fire that is due now instead"


def catch_up(n: int) -> str:
    return f"missed; catch_up starts only the latest {n} (max_catch_up)"


MISSED_TABLE = [
    # policy, now, [(minutes after T, action, reason, missed)], next fire (minutes after T)
    ({"on_missed": "skip"}, THREE_LATE,
     [(0, "skip", SKIP, True), (5, "skip", SKIP, True), (10, "skip", SKIP, True)], 15),
    ({"on_missed": "skip"}, FOURTH_ON_TIME,
     [(0, "skip", SKIP, True), (5, "skip", SKIP, True), (10, "skip", SKIP, True), (15, "start", None, False)], 20),
    ({"on_missed": "run_once"}, THREE_LATE,
     [(0, "skip", ONCE_LATEST, True), (5, "skip", ONCE_LATEST, True), (10, "start", None, True)], 15),
    ({"on_missed": "run_once"}, FOURTH_ON_TIME,
     [(0, "skip", ONCE_NOW, True), (5, "skip", ONCE_NOW, True), (10, "skip", ONCE_NOW, True),
      (15, "start", None, False)], 20),
    ({"on_missed": "catch_up", "max_catch_up": 2}, THREE_LATE,
     [(0, "skip", catch_up(2), True), (5, "start", None, True), (10, "start", None, True)], 15),
    ({"on_missed": "catch_up", "max_catch_up": 2}, FOURTH_ON_TIME,
     [(0, "skip", catch_up(2), True), (5, "start", None, True), (10, "start", None, True),
      (15, "start", None, False)], 20),
    ({"on_missed": "catch_up"}, THREE_LATE,
     [(0, "start", None, True), (5, "start", None, True), (10, "start", None, True)], 15),
    # inside the grace period a fire is not missed at all
    ({"on_missed": "skip"}, T + 10 * MINUTE + GRACE_S,
     [(0, "skip", SKIP, True), (5, "skip", SKIP, True), (10, "start", None, False)], 15),
]


@pytest.mark.parametrize("policy, now, expected, next_fire", MISSED_TABLE)
def test_missed_fires_follow_on_missed(policy, now, expected, next_fire):
    s = schedule(schedule="*/5 * * * *", **policy)
    fires, next_at = s.plan(T, now, GRACE_S)
    assert fires == [Fire(T + m * MINUTE, action, reason, missed) for m, action, reason, missed in expected]
    assert next_at == T + next_fire * MINUTE


FREEZE = {"freeze": {"ranges": [{"from": "2026-06-01T10:10:00", "to": "2026-06-01T10:11:00"}]}}
FROZEN = "excluded by calendar 'freeze': within 2026-06-01T10:10:00 to 2026-06-01T10:11:00"


@pytest.mark.parametrize("policy, expected", [
    # the calendar has its say first: the latest missed fire is excluded, so run_once takes the one before
    ({"on_missed": "run_once"}, [(0, "skip", ONCE_LATEST), (5, "start", None), (10, "skip", FROZEN)]),
    ({"on_missed": "catch_up", "max_catch_up": 1}, [(0, "skip", catch_up(1)), (5, "start", None), (10, "skip", FROZEN)]),
    ({"on_missed": "skip"}, [(0, "skip", SKIP), (5, "skip", SKIP), (10, "skip", FROZEN)]),
])
def test_calendar_blocked_fires_are_skipped_before_the_policy_picks(policy, expected):
    s = schedule(FREEZE, schedule="*/5 * * * *", exclude=["freeze"], **policy)
    fires, _ = s.plan(T, THREE_LATE, GRACE_S)
    assert fires == [Fire(T + m * MINUTE, action, reason, missed=True) for m, action, reason in expected]


def test_an_on_time_fire_blocked_by_a_calendar_is_not_missed():
    s = schedule(FREEZE, schedule="*/5 * * * *", exclude=["freeze"], on_missed="run_once")
    fires, _ = s.plan(T + 10 * MINUTE, T + 10 * MINUTE + 1, GRACE_S)
    assert fires == [Fire(T + 10 * MINUTE, "skip", FROZEN, missed=False)]


def check_long_outage(fires: list[Fire], total: int, *, started: int, first: float) -> None:
    """Records stay few; together they account for every fire exactly once."""
    starts = [f for f in fires if f.action == "start"]
    skips = [f for f in fires if f.action == "skip"]
    assert len(starts) == started
    assert len(fires) <= MAX_RECORDED_MISSED + started + 1
    assert sum(f.count for f in skips) + len(starts) == total
    summary = fires[0]
    assert summary.action == "skip" and summary.missed and summary.count > 1
    assert summary.scheduled_at == first  # dated at the oldest fire it stands for
    assert summary.reason == f"{summary.count} earlier fires missed while Baton was not running"
    assert all(f.count == 1 for f in fires[1:])
    times = [f.scheduled_at for f in fires]
    assert times == sorted(times) and len(set(times)) == len(times)


@pytest.mark.parametrize("policy, started", [
    ({"on_missed": "skip"}, 1), ({"on_missed": "run_once"}, 1), ({"on_missed": "catch_up", "max_catch_up": 5}, 6),
])
def test_an_interval_schedule_down_for_thirty_days(policy, started):
    s = schedule(interval="1m", **policy)
    now = T + 30 * DAY + 30  # the last tick (T + 30d) is on time
    fires, next_at = s.plan(T, now, GRACE_S)
    check_long_outage(fires, 30 * 24 * 60 + 1, started=started, first=T)
    assert fires[-1] == Fire(T + 30 * DAY, "start")
    assert next_at == T + 30 * DAY + MINUTE


@pytest.mark.parametrize("policy, started", [
    ({"on_missed": "skip"}, 0), ({"on_missed": "run_once"}, 1), ({"on_missed": "catch_up", "max_catch_up": 1000}, 1000),
])
def test_a_cron_schedule_down_for_three_days(policy, started):
    s = schedule(schedule="* * * * *", **policy)
    now = T + 3 * DAY + 45  # with a 30 s grace, every fire is late
    fires, next_at = s.plan(T, now, grace_s=30)
    check_long_outage(fires, 3 * 24 * 60 + 1, started=started, first=T)
    assert all(f.missed for f in fires)
    if started:
        assert [f.scheduled_at for f in fires if f.action == "start"][-1] == T + 3 * DAY
    assert next_at == T + 3 * DAY + MINUTE


def test_a_seconds_cron_down_for_long_stays_bounded(monkeypatch):
    # too many fires to walk one by one: after MAX_SCAN of them the scan jumps to the
    # last SCAN_TAIL_S before now, and the summary's count becomes a lower bound of what
    # was missed (scaled down here: 1000 fires, a 10-minute tail, one hour down)
    monkeypatch.setattr(schedules, "MAX_SCAN", 1000)
    monkeypatch.setattr(schedules, "SCAN_TAIL_S", 600.0)
    s = schedule(schedule="* * * * * *")
    now = T + HOUR + 0.5
    fires, next_at = s.plan(T, now, GRACE_S)
    skips = [f for f in fires if f.action == "skip"]
    assert len(fires) <= MAX_RECORDED_MISSED + 61
    assert 1000 < sum(f.count for f in skips) + 60 < 3601
    # the fires of the last minute are within the grace period: on time
    assert [f.scheduled_at for f in fires if f.action == "start"] == [T + HOUR - k for k in range(59, -1, -1)]
    assert [f.scheduled_at for f in skips[1:]] == [T + HOUR - k for k in range(100, 59, -1)]
    assert next_at == T + HOUR + 1


def test_the_summary_folds_the_oldest_records_without_earlier_fires():
    # plan_fires on its own: 150 skipped records fold to 100 plus one summary of 50
    s = schedule(schedule="* * * * *")
    fires = [T + k * MINUTE for k in range(150)]
    out = plan_fires(s, fires, 0, T + 200 * MINUTE, GRACE_S)
    assert len(out) == MAX_RECORDED_MISSED + 1
    assert out[0] == Fire(T, "skip", "50 earlier fires missed while Baton was not running", missed=True, count=50)
    assert out[1].scheduled_at == T + 50 * MINUTE


# -------------------------------------------------------------------- the models


@pytest.mark.parametrize("model, spec, message", [
    (CronTrigger, {"schedule": "61 * * * *"}, "invalid cron expression '61 * * * *': Bad minute"),
    (CronTrigger, {"schedule": "0 0 * *"}, "invalid cron expression '0 0 * *': Wrong number of fields"),
    (CronTrigger, {"schedule": "@reboot"}, "invalid cron expression '@reboot'"),
    (CronTrigger, {"schedule": "0 0 31 2 *"}, "invalid cron expression '0 0 31 2 *': Bad day-of-month"),
    (CronTrigger, {"schedule": "* * * * *", "timezone": "Europe/Berln"}, "unknown time zone 'Europe/Berln'"),
    (CronTrigger, {"schedule": "* * * * *", "timezone": "CEST"}, "unknown time zone 'CEST'"),
    (CronTrigger, {"schedule": "* * * * *", "max_catch_up": 3}, "max_catch_up applies to on_missed: catch_up"),
    (CronTrigger, {"schedule": "* * * * *", "on_missed": "run_once", "max_catch_up": 3},
     "max_catch_up applies to on_missed: catch_up"),
    (CronTrigger, {"schedule": "* * * * *", "on_missed": "catch_up", "max_catch_up": 0}, "greater than or equal to 1"),
    (CronTrigger, {"schedule": "* * * * *", "start": date(2026, 3, 2), "end": date(2026, 3, 1)},
     "end (2026-03-01) is before start (2026-03-02)"),
    (CronTrigger, {"schedule": "* * * * *", "start": datetime(2026, 3, 1, 12), "end": date(2026, 3, 1)},
     "end (2026-03-01) is before start (2026-03-01 12:00:00)"),
    (CronTrigger, {"schedule": "* * * * *", "start": "2026-03-01T09:00+01:00"}, "write start/end without an offset"),
    (CronTrigger, {"schedule": "* * * * *", "end": "2026-03-01T09:00Z"}, "write start/end without an offset"),
    (CronTrigger, {"schedule": "* * * * *", "on_missed": "later"}, "'skip', 'run_once' or 'catch_up'"),
    (CronTrigger, {"schedule": "* * * * *", "exclude": ["not a name"]}, "should match pattern"),
    (CronTrigger, {"schedule": "* * * * *", "cron": "* * * * *"}, "Extra inputs are not permitted"),
    (EveryTrigger, {"interval": "500ms"}, "greater than or equal to 1"),
    (EveryTrigger, {"interval": 0}, "greater than or equal to 1"),
    (EveryTrigger, {"interval": "soon"}, "soon"),
])
def test_schedule_models_refuse_bad_specs(model, spec, message):
    with pytest.raises(ValidationError) as info:
        model(**spec)
    assert message in str(info.value)


def test_an_offset_bound_next_to_a_naive_one_is_a_validation_error():
    with pytest.raises(ValidationError, match="without an offset"):
        CronTrigger(schedule="* * * * *", start="2026-03-01T09:00+01:00", end="2026-03-02T09:00")


def test_a_date_written_as_a_string_is_a_whole_day():
    assert CronTrigger(schedule="* * * * *", end="2026-03-01").end == date(2026, 3, 1)


@pytest.mark.parametrize("text, expanded", [
    ("@daily", "0 0 * * *"), ("@midnight", "0 0 * * *"), ("@hourly", "0 * * * *"), ("@weekly", "0 0 * * 0"),
    ("@monthly", "0 0 1 * *"), ("@yearly", "0 0 1 1 *"), ("@annually", "0 0 1 1 *"), ("@DAILY", "0 0 * * *"),
    (" 0 7 * * MON-FRI ", "0 7 * * MON-FRI"),
])
def test_cron_macros_are_accepted_and_expanded(text, expanded):
    s = schedule(schedule=text)
    assert s.spec.schedule == text and s.expr == expanded and s.text == text
    assert s.next_after(utc("2026-03-10T10:30Z")) == schedule(schedule=expanded).next_after(utc("2026-03-10T10:30Z"))


def test_a_trigger_has_one_kind_and_names_its_schedule():
    cron = Trigger(cron={"schedule": "@daily"})
    every = Trigger(every={"interval": "15m"})
    assert isinstance(cron.schedule, CronTrigger) and isinstance(every.schedule, EveryTrigger)
    assert Trigger(event={"subject": "orders.created"}).schedule is None
    with pytest.raises(ValidationError, match="exactly one of event, webhook, cron, every"):
        Trigger(cron={"schedule": "@daily"}, every={"interval": "1h"})


def test_schedule_defaults():
    spec = EveryTrigger(interval="15m")
    assert (spec.timezone, spec.on_missed, spec.max_catch_up, spec.overlap, spec.jitter) == ("UTC", "skip", 10, "skip", 0.0)
    assert EveryTrigger(interval="1h30m").interval == 5400.0


@pytest.mark.parametrize("named, ordinal, total, expected", [
    (None, 1, 1, "nightly-report"),
    (None, 1, 3, "nightly-report#1"),
    (None, 2, 3, "nightly-report#2"),
    ("eu-morning", 2, 3, "eu-morning"),
])
def test_schedule_name_defaults_to_the_workflow(named, ordinal, total, expected):
    assert schedule_name("nightly-report", ordinal, total, CronTrigger(schedule="@daily", name=named)) == expected


@pytest.mark.parametrize("spec, field, message", [
    ({"exclude": ["freeze"]}, "exclude", "unknown calendar 'freeze' (known: business-hours, month-end, us-holidays)"),
    ({"only_within": ["weekdays"]}, "only_within", "unknown calendar 'weekdays' (known: business-hours"),
    ({"input": {"day": "{{ event.data. }}"}}, "input", "invalid expression"),
    ({"workflow_id": "report-{{ event.data.scheduled_at"}, "workflow_id", "invalid template"),
])
def test_compile_schedule_names_the_field_that_is_wrong(spec, field, message):
    with pytest.raises(ScheduleError) as info:
        schedule(CALENDARS, schedule="@daily", **spec)
    assert info.value.field == field and message in info.value.message


def test_compile_schedule_with_no_calendars_configured():
    with pytest.raises(ScheduleError, match=re.escape("unknown calendar 'x' (known: none are configured")):
        schedule(schedule="@daily", exclude=["x"])


def test_describe_and_text():
    assert describe(schedule(interval="15m")) == "every 15m"
    assert describe(schedule(interval="90s")) == "every 90s"
    assert describe(schedule(interval="2d")) == "every 2d"
    assert describe(schedule(schedule="0 19 * * MON-FRI", timezone="America/Los_Angeles")).endswith(
        "(America/Los_Angeles)")
    assert "19:00" in describe(schedule(schedule="0 19 * * MON-FRI"))


def test_spec_hash_follows_the_fire_times_not_the_input():
    base = schedule(schedule="@daily")
    assert base.spec_hash == schedule(schedule="@daily", input={"x": 1}, on_missed="run_once").spec_hash
    assert base.spec_hash != schedule(schedule="@hourly").spec_hash
    assert base.spec_hash != schedule(schedule="@daily", timezone="Europe/Berlin").spec_hash
    assert base.spec_hash != schedule(schedule="@daily", end=date(2027, 1, 1)).spec_hash


# ------------------------------------------------------------------------ a fire


def test_run_id_is_stable_per_schedule_and_tick():
    a, again = schedule(schedule="@daily"), schedule(schedule="@daily")
    t1, t2 = utc("2026-03-10T00:00Z"), utc("2026-03-11T00:00Z")
    assert a.run_id(t1) == again.run_id(t1)
    assert re.fullmatch(r"[0-9a-f]{32}", a.run_id(t1))
    ids = {a.run_id(t1), a.run_id(t2), schedule(schedule="@daily", name="other").run_id(t1),
           schedule(schedule="@daily", workflow="wf2").run_id(t1), schedule(schedule="@daily", index=1).run_id(t1)}
    assert len(ids) == 5


def test_run_id_of_an_interval_tick_is_the_same_from_due_and_next_after():
    s = schedule(interval="1100ms", start=datetime(2026, 1, 1, 0, 0, 0, 300_000))
    first = s.next_after(utc("2026-03-01T00:00Z"))
    fires, _ = s.due(first, first + 5000, keep=10_000)
    assert [s.run_id(f) for f in fires] == [s.run_id(f) for f in walk(s, first - 0.001, first + 5000)]


def test_the_fire_event_is_a_cloudevent():
    s = schedule(name="eu-morning", schedule="0 7 * * *", timezone="Europe/Berlin")
    scheduled, fired = utc("2026-03-30T05:00Z"), utc("2026-03-30T05:00:02.250Z")
    assert s.event(scheduled, fired) == {
        "specversion": "1.0",
        "id": "eu-morning@2026-03-30T05:00:00.000Z",
        "source": "/baton/schedules/eu-morning",
        "type": FIRE_EVENT_TYPE,
        "time": "2026-03-30T05:00:02.250Z",
        "datacontenttype": "application/json",
        "data": {
            "schedule": "eu-morning",
            "scheduled_at": "2026-03-30T05:00:00.000Z",
            "scheduled_local": "2026-03-30T07:00:00+02:00",
            "timezone": "Europe/Berlin",
            "fired_at": "2026-03-30T05:00:02.250Z",
            "missed": False,
            "manual": False,
        },
    }
    assert FIRE_EVENT_TYPE == "baton.schedule.fired"


def test_a_manual_fire_has_its_own_event_id():
    s = schedule(name="eu-morning", schedule="0 7 * * *")
    scheduled = utc("2026-03-30T07:00Z")
    manual = s.event(scheduled, scheduled + 10, manual=True, by="alice")
    assert manual["id"] == "eu-morning@2026-03-30T07:00:00.000Z/manual@2026-03-30T07:00:10.000Z"
    assert manual["data"]["manual"] is True and manual["data"]["by"] == "alice"
    assert s.event(scheduled, scheduled + 600, missed=True)["data"]["missed"] is True
    assert "by" not in s.event(scheduled, scheduled)["data"]


def test_render_gives_the_templates_the_event():
    s = schedule(schedule="0 7 * * *", timezone="America/New_York", name="report",
                 input={"day": "{{ event.data.scheduled_local[:10] }}", "late": "{{ event.data.missed }}", "fixed": 1},
                 workflow_id="report-{{ event.data.scheduled_local[:10] }}")
    event = s.event(local(NEW_YORK, 2026, 3, 10, 7), local(NEW_YORK, 2026, 3, 10, 7, 5), missed=True)
    assert s.render(event) == ({"day": "2026-03-10", "late": True, "fixed": 1}, "report-2026-03-10")


@pytest.mark.parametrize("spec, expected", [
    ({}, ({}, None)),
    ({"input": {"region": "eu"}}, ({"region": "eu"}, None)),
    ({"workflow_id": "{{ event.data.schedule }}"}, ({}, "nightly")),
    ({"workflow_id": "{{ '' }}"}, ({}, None)),
    ({"workflow_id": "{{ 42 }}"}, ({}, "42")),
])
def test_render_defaults(spec, expected):
    s = schedule(schedule="@daily", **spec)
    assert s.render(s.event(utc("2026-03-10T00:00Z"), utc("2026-03-10T00:00Z"))) == expected


def test_render_of_a_static_input_gives_a_fresh_copy():
    s = schedule(schedule="@daily", input={"items": [1, 2]})
    event = s.event(utc("2026-03-10T00:00Z"), utc("2026-03-10T00:00Z"))
    first, _ = s.render(event)
    first["items"].append(3)
    assert s.render(event)[0] == {"items": [1, 2]}


def test_render_errors_are_expression_errors():
    s = schedule(schedule="@daily", input={"x": "{{ event.data.nope.deeper }}"})
    with pytest.raises(ExpressionError):
        s.render(s.event(utc("2026-03-10T00:00Z"), utc("2026-03-10T00:00Z")))


# --------------------------------------------------------------------- settings


def test_schedule_settings(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # load_settings merges config/baton.yaml (or BATON_CONFIG) under these
    monkeypatch.delenv("BATON_CONFIG", raising=False)
    settings = load_settings(schedules={"misfire_grace_s": 30, "keep_fires": 50})
    assert (settings.schedules.misfire_grace_s, settings.schedules.keep_fires) == (30.0, 50)
    with pytest.raises(ConfigError, match="schedules.misfire_grace_s"):
        load_settings(schedules={"misfire_grace_s": 0})
    with pytest.raises(ConfigError, match="schedules.keep_fires"):
        load_settings(schedules={"keep_fires": 5})
    with pytest.raises(ConfigError, match="schedules.grace"):
        load_settings(schedules={"grace": 5})
