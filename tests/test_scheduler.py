"""The scheduler end to end, in-process: real runtime, real SQLite file, real API on
loopback, and a ManualClock that walks schedules across DST changes, outages and
months without waiting.

Each test moves the clock, then waits (bounded) until the fire records it expects
are committed; never a fixed sleep.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from server.errors import DefinitionError
from server.runtime.clock import ManualClock, iso
from server.settings import Settings
from server.triggers.scheduler import IDLE_S
from server.api.schedules import CalendarList, FirePage, ScheduleList, ScheduleRunStarted, ScheduleView
from tests.inproc import api_client, call, eventually, runtime_of, sql, where

WAIT_S = 10.0


@pytest.fixture(autouse=True)
def _no_repository_config(tmp_path, monkeypatch):
    # Settings merge config/baton.yaml (or BATON_CONFIG) under what a test passes: an
    # uncommented `schedules:` or `calendars:` there would change the grace or the calendars
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BATON_CONFIG", raising=False)


def workflow(name: str, trigger: str, steps: str = "  - {id: a, task: echo, input: {fired: '{{ event.data.scheduled_local }}'}}") -> str:
    return f"name: {name}\ntriggers:\n  - {trigger}\nsteps:\n{steps}\n"


WAITS_FOR_SIGNAL = "  - {id: hold, wait_for_signal: {signal: go}}"


def make_settings(tmp_path, files: dict[str, str], **overrides: Any) -> Settings:
    wf = tmp_path / "wf"
    wf.mkdir(parents=True, exist_ok=True)
    for old in wf.iterdir():
        old.unlink()
    for name, text in files.items():
        (wf / f"{name}.yaml").write_text(text)
    base: dict[str, Any] = dict(data_dir=tmp_path / "data", workflows=[wf], handler_modules=[],
                                auth={"enabled": False}, nats={"enabled": False}, limits={"shutdown_grace_s": 0.5})
    return Settings(**{**base, **overrides})


def at(text: str, tz: str = "UTC") -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp()


@asynccontextmanager
async def serving(settings: Settings, clock: ManualClock) -> AsyncIterator[Any]:
    async with api_client(settings, clock) as client:
        yield client


async def fires(client, name: str) -> list[dict[str, Any]]:
    """Oldest first."""
    body = await call(client, "GET", f"/v1/schedules/{name}/fires?limit=500")
    return list(reversed(body["fires"]))


async def fires_reaching(client, name: str, count: int) -> list[dict[str, Any]]:
    async def check():
        got = await fires(client, name)
        return got if len(got) >= count else None
    return await eventually(check, f"{count} fire records of {name}")


async def settled(client, clock: ManualClock, name: str) -> dict[str, Any]:
    """The schedule's view once nothing of it is due any more (what was due is committed)."""
    async def check():
        view = await call(client, "GET", f"/v1/schedules/{name}")
        nxt = view["next_fires"]
        return view if view["paused"] or not nxt or datetime.fromisoformat(nxt[0]["at"]).timestamp() > clock.now() else None
    return await eventually(check, f"schedule {name} to catch up with the clock")


async def step_to(client, clock: ManualClock, name: str, t: float) -> list[dict[str, Any]]:
    """Move the clock to `t` one fire at a time, letting each fire commit before the next move."""
    while True:
        view = await settled(client, clock, name)
        upcoming = [f for f in view["next_fires"] if datetime.fromisoformat(f["at"]).timestamp() <= t]
        if not upcoming:
            break
        before = len(await fires(client, name))
        clock.set(max(clock.now(), datetime.fromisoformat(upcoming[0]["at"]).timestamp()))
        await fires_reaching(client, name, before + 1)
    clock.set(t)
    return await fires(client, name)


def local(fire: dict[str, Any], tz: str) -> str:
    return datetime.fromisoformat(fire["scheduled_at"]).astimezone(ZoneInfo(tz)).isoformat()


# --- DST -----------------------------------------------------------------------------


@pytest.mark.parametrize("tz, spring, fall", [
    ("Europe/Berlin", "2026-03-28T12:00", "2026-10-24T12:00"),
    ("America/New_York", "2026-03-07T12:00", "2026-10-31T12:00"),
])
async def test_cron_across_both_dst_changes_fires_once_per_day(tmp_path, tz, spring, fall):
    # 02:30 does not exist on the spring-forward day in either zone; in Berlin it also
    # happens twice on the fall-back day (02:00-03:00 repeats), in New York 01:30 does
    hour = "2" if tz == "Europe/Berlin" else "1"
    files = {"nightly": workflow("nightly", f"cron: {{schedule: '30 2 * * *', timezone: {tz}}}"),
             "early": workflow("early", f"cron: {{schedule: '30 {hour} * * *', timezone: {tz}}}")}
    clock = ManualClock(at(spring, tz))
    async with serving(make_settings(tmp_path, files), clock) as client:
        got = await step_to(client, clock, "nightly", at(spring, tz) + 3 * 86400)
        assert [local(f, tz)[:25] for f in got] == [
            f"{spring[:8]}{int(spring[8:10]) + 1:02d}T03:00:00{'+02:00' if tz == 'Europe/Berlin' else '-04:00'}",
            f"{spring[:8]}{int(spring[8:10]) + 2:02d}T02:30:00{'+02:00' if tz == 'Europe/Berlin' else '-04:00'}",
            f"{spring[:8]}{int(spring[8:10]) + 3:02d}T02:30:00{'+02:00' if tz == 'Europe/Berlin' else '-04:00'}",
        ]
        assert all(f["outcome"] == "started" and not f["missed"] for f in got)
        # each fire's run carries the schedule's event, in local time
        ended = await call(client, "GET", f"/v1/runs/{got[0]['run_id']}/wait?timeout={WAIT_S:g}")
        assert ended["status"] == "succeeded"
        run = await call(client, "GET", f"/v1/runs/{got[0]['run_id']}")
        assert run["output"] == {"fired": datetime.fromisoformat(got[0]["scheduled_at"]).astimezone(ZoneInfo(tz)).isoformat()}

    clock = ManualClock(at(fall, tz))
    async with serving(make_settings(tmp_path / "fall", files), clock) as client:
        got = await step_to(client, clock, "early", at(fall, tz) + 2 * 86400)
        fall_date = (datetime.fromisoformat(fall) + timedelta(days=1)).date().isoformat()
        fall_day = [f for f in got if local(f, tz)[:10] == fall_date]
        assert len(fall_day) == 1, got  # the repeated hour fires once, at its first occurrence
        summer = "+02:00" if tz == "Europe/Berlin" else "-04:00"
        assert local(fall_day[0], tz).endswith(summer)
        # and the next day's fire is 25 real hours later
        nxt = got[got.index(fall_day[0]) + 1]
        gap = datetime.fromisoformat(nxt["scheduled_at"]) - datetime.fromisoformat(fall_day[0]["scheduled_at"])
        assert gap.total_seconds() == 25 * 3600


async def test_every_fires_on_multiples_of_its_interval(tmp_path):
    clock = ManualClock(at("2026-06-01T10:07:30"))
    files = {"poll": workflow("poll", "every: {interval: 15m}")}
    async with serving(make_settings(tmp_path, files), clock) as client:
        view = await call(client, "GET", "/v1/schedules/poll")
        assert [f["at"] for f in view["next_fires"]] == [
            "2026-06-01T10:15:00.000Z", "2026-06-01T10:30:00.000Z", "2026-06-01T10:45:00.000Z",
            "2026-06-01T11:00:00.000Z", "2026-06-01T11:15:00.000Z"]
        got = await step_to(client, clock, "poll", at("2026-06-01T11:00:00"))
        assert [f["scheduled_at"] for f in got] == [
            "2026-06-01T10:15:00.000Z", "2026-06-01T10:30:00.000Z", "2026-06-01T10:45:00.000Z",
            "2026-06-01T11:00:00.000Z"]
        assert len({f["run_id"] for f in got}) == 4
        for f in got:  # history says who started each run, and for which tick
            (started, *_) = (await call(client, "GET", f"/v1/runs/{f['run_id']}/history"))["events"]
            assert started["data"]["by"] == "schedule:poll"
            assert started["data"]["event"]["id"] == f"poll@{f['scheduled_at']}"


# --- calendars -----------------------------------------------------------------------

CALENDARS = {
    "month-end-close": {"timezone": "America/New_York", "last_business_days": 2},
    "maintenance": {"timezone": "UTC", "windows": [{"cron": "0 2 * * SAT", "duration": "4h"}]},
}


async def test_a_fire_in_an_excluded_calendar_is_skipped_with_its_reason(tmp_path):
    # November 2026 ends on a Monday: its last 2 business days are Fri 27th and Mon 30th
    files = {"stop-dev": workflow("stop-dev", "cron: {schedule: '0 19 * * MON-FRI', timezone: America/New_York, "
                                              "exclude: [month-end-close]}")}
    clock = ManualClock(at("2026-11-25T12:00", "America/New_York"))
    async with serving(make_settings(tmp_path, files, calendars=CALENDARS), clock) as client:
        view = await call(client, "GET", "/v1/schedules/stop-dev")
        assert [f["skip"] is not None for f in view["next_fires"]] == [False, False, True, True, False]
        got = await step_to(client, clock, "stop-dev", at("2026-12-01T20:00", "America/New_York"))
        outcomes = [(local(f, "America/New_York")[:10], f["outcome"]) for f in got]
        assert outcomes == [("2026-11-25", "started"), ("2026-11-26", "started"), ("2026-11-27", "skipped"),
                            ("2026-11-30", "skipped"), ("2026-12-01", "started")]
        assert got[2]["reason"].startswith("excluded by calendar 'month-end-close': 2026-11-27 is one of the last 2 business days")
        assert got[2]["run_id"] is None
        calendars = await call(client, "GET", "/v1/calendars")
        assert {c["name"] for c in calendars["calendars"]} == {"month-end-close", "maintenance"}


async def test_only_within_keeps_fires_inside_the_window(tmp_path):
    files = {"reboot": workflow("reboot", "every: {interval: 1h, only_within: [maintenance]}")}
    clock = ManualClock(at("2026-06-06T00:30"))  # a Saturday
    async with serving(make_settings(tmp_path, files, calendars=CALENDARS), clock) as client:
        got = await step_to(client, clock, "reboot", at("2026-06-06T07:00"))
        started = [f["scheduled_at"][11:16] for f in got if f["outcome"] == "started"]
        assert started == ["02:00", "03:00", "04:00", "05:00"]
        skipped = [f for f in got if f["outcome"] == "skipped"]
        assert {f["reason"] for f in skipped} == {"outside calendar 'maintenance'"}


async def test_an_unknown_calendar_stops_start_up_naming_file_and_trigger(tmp_path):
    files = {"x": workflow("x", "cron: {schedule: '0 7 * * *', exclude: [no-such-calendar]}")}
    with pytest.raises(DefinitionError) as err:
        async with serving(make_settings(tmp_path, files, calendars=CALENDARS), ManualClock(0)):
            pass
    assert "x.yaml:3: triggers[0].cron.exclude: unknown calendar 'no-such-calendar'" in str(err.value)
    assert "maintenance" in str(err.value)


# --- missed fires ----------------------------------------------------------------------


@pytest.mark.parametrize("policy, started, skipped", [
    ("skip", [], ["10:01", "10:02", "10:03"]),
    ("run_once", ["10:03"], ["10:01", "10:02"]),
    ("catch_up", ["10:01", "10:02", "10:03"], []),
    ("catch_up, max_catch_up: 2", ["10:02", "10:03"], ["10:01"]),
])
async def test_missed_fires_after_a_three_fire_outage_follow_on_missed(tmp_path, policy, started, skipped):
    files = {"tick": workflow("tick", f"every: {{interval: 1m, on_missed: {policy}, overlap: allow}}")}
    settings = make_settings(tmp_path, files, schedules={"misfire_grace_s": 10})
    clock = ManualClock(at("2026-06-01T10:00:30"))
    async with serving(settings, clock):
        pass  # the schedule is stored with its next fire, 10:01
    clock.set(at("2026-06-01T10:03:45"))  # down for 10:01, 10:02 and 10:03, back 45 s (> the grace) after the last
    restarted = ManualClock(clock.now())
    async with serving(settings, restarted) as client:
        got = await fires_reaching(client, "tick", 3)
        assert len(got) == 3
        assert sorted(f["scheduled_at"][11:16] for f in got if f["outcome"] == "started") == started
        assert sorted(f["scheduled_at"][11:16] for f in got if f["outcome"] == "skipped") == skipped
        assert all(f["missed"] for f in got)
        for f in got:
            if f["outcome"] == "started":  # the run's history says it was a missed fire
                history = await call(client, "GET", f"/v1/runs/{f['run_id']}/history")
                started_event = history["events"][0]
                assert started_event["data"]["event"]["data"]["missed"] is True
        # the records are visible once committed; the row moves on just after: wait for it
        view = await settled(client, restarted, "tick")
        assert view["next_fires"][0]["at"] == "2026-06-01T10:04:00.000Z"


async def test_schedules_catching_up_together_start_in_the_order_of_their_last_fire(tmp_path):
    # named so that sorting by name would get it wrong: "start" < "stop"
    files = {"envs": "name: envs\ntriggers:\n"
             "  - cron: {name: stop-envs, schedule: '0 19 * * *', on_missed: run_once, input: {action: stop}}\n"
             "  - cron: {name: start-envs, schedule: '0 7 * * *', on_missed: run_once, input: {action: start}}\n"
             "steps:\n  - {id: a, task: echo, input: {action: '{{ input.action }}'}}\n"}
    settings = make_settings(tmp_path, files)
    async with serving(settings, ManualClock(at("2026-06-01T18:00"))):
        pass
    # down from 18:00 to 08:00 the next day: both the 19:00 stop and the 07:00 start were missed
    async with serving(settings, ManualClock(at("2026-06-02T08:00"))) as client:
        (stop,) = await fires_reaching(client, "stop-envs", 1)
        (start,) = await fires_reaching(client, "start-envs", 1)
        assert stop["outcome"] == start["outcome"] == "started"
        assert stop["id"] < start["id"]  # started, and recorded, first


async def test_a_fire_late_by_less_than_the_grace_runs_as_usual(tmp_path):
    files = {"tick": workflow("tick", "every: {interval: 1m, on_missed: skip}")}
    settings = make_settings(tmp_path, files)
    clock = ManualClock(at("2026-06-01T10:00:30"))
    async with serving(settings, clock):
        pass
    async with serving(settings, ManualClock(at("2026-06-01T10:01:20"))) as client:
        got = await fires_reaching(client, "tick", 1)
        assert [(f["scheduled_at"][11:16], f["outcome"], f["missed"]) for f in got] == [("10:01", "started", False)]


async def test_a_restart_never_fires_a_tick_twice(tmp_path):
    files = {"tick": workflow("tick", "every: {interval: 1m}")}
    settings = make_settings(tmp_path, files)
    clock = ManualClock(at("2026-06-01T10:00:30"))
    async with serving(settings, clock) as client:
        got = await step_to(client, clock, "tick", at("2026-06-01T10:02:10"))
        assert len(got) == 2
    async with serving(settings, ManualClock(clock.now())) as client:
        # the store says 10:03 comes next: nothing is due, nothing is re-fired
        view = await call(client, "GET", "/v1/schedules/tick")
        assert view["next_fires"][0]["at"] == "2026-06-01T10:03:00.000Z"
        assert view["last_fire_at"] == "2026-06-01T10:02:00.000Z"
        runs = await call(client, "GET", "/v1/runs?workflow=tick")
        assert len(runs["runs"]) == 2


async def test_a_tick_fired_again_after_a_crash_finds_the_run_it_started(tmp_path):
    # A crash after a fire's run was committed but before the schedule's row moved on:
    # put the row back where it stood, and drop the fire records that commit with it
    files = {"tick": workflow("tick", "every: {interval: 1m}")}
    settings = make_settings(tmp_path, files, schedules={"misfire_grace_s": 300})  # the re-fire is on time
    clock = ManualClock(at("2026-06-01T10:00:30"))
    async with serving(settings, clock) as client:
        first = await step_to(client, clock, "tick", at("2026-06-01T10:02:10"))
        assert [f["outcome"] for f in first] == ["started", "started"]
    sql(where(settings), "UPDATE schedules SET next_at = ?, last_fire_at = NULL, last_run_id = NULL,"
        " last_outcome = NULL WHERE name = 'tick'", at("2026-06-01T10:01:00"))
    sql(where(settings), "DELETE FROM schedule_fires WHERE schedule = 'tick'")
    async with serving(settings, ManualClock(clock.now())) as client:
        again = await fires_reaching(client, "tick", 2)
        assert [(f["scheduled_at"][11:16], f["outcome"], f["reason"], f["run_id"]) for f in again] == [
            ("10:01", "started", "started before a restart", first[0]["run_id"]),
            ("10:02", "started", "started before a restart", first[1]["run_id"])]
        runs = await call(client, "GET", "/v1/runs?workflow=tick")
        assert len(runs["runs"]) == 2  # the same two runs, none started twice


# --- overlap ---------------------------------------------------------------------------


async def _two_fires(client, clock, name: str) -> list[dict[str, Any]]:
    await step_to(client, clock, name, at("2026-06-01T10:01:00"))
    return await step_to(client, clock, name, at("2026-06-01T10:02:00"))


def overlapping(policy: str) -> dict[str, str]:
    return {"hold": workflow("hold", f"every: {{interval: 1m, overlap: {policy}}}", WAITS_FOR_SIGNAL)}


async def test_overlap_allow_starts_while_the_previous_run_is_open(tmp_path):
    clock = ManualClock(at("2026-06-01T10:00:30"))
    async with serving(make_settings(tmp_path, overlapping("allow")), clock) as client:
        got = await _two_fires(client, clock, "hold")
        assert [f["outcome"] for f in got] == ["started", "started"]
        runs = await call(client, "GET", "/v1/runs?workflow=hold&status=running")
        assert len(runs["runs"]) == 2


async def test_overlap_skip_skips_while_the_previous_run_is_open(tmp_path):
    clock = ManualClock(at("2026-06-01T10:00:30"))
    async with serving(make_settings(tmp_path, overlapping("skip")), clock) as client:
        got = await _two_fires(client, clock, "hold")
        assert [f["outcome"] for f in got] == ["started", "skipped"]
        assert got[1]["reason"] == f"run {got[0]['run_id']} of the previous fire is still running (overlap: skip)"
        # once it ends, the next fire starts again
        await call(client, "POST", f"/v1/runs/{got[0]['run_id']}/signals/go", expect=202, json={})
        ended = await call(client, "GET", f"/v1/runs/{got[0]['run_id']}/wait?timeout={WAIT_S:g}")
        assert ended["status"] == "succeeded"
        got = await step_to(client, clock, "hold", at("2026-06-01T10:03:00"))
        assert got[-1]["outcome"] == "started"


async def test_overlap_queue_starts_the_held_fire_when_the_previous_run_ends(tmp_path):
    clock = ManualClock(at("2026-06-01T10:00:30"))
    async with serving(make_settings(tmp_path, overlapping("queue")), clock) as client:
        got = await _two_fires(client, clock, "hold")
        assert [f["outcome"] for f in got] == ["started", "queued"]
        assert (await call(client, "GET", "/v1/schedules/hold"))["queued"] == 1
        await call(client, "POST", f"/v1/runs/{got[0]['run_id']}/signals/go", expect=202, json={})
        got = await fires_reaching(client, "hold", 3)
        assert got[2]["outcome"] == "started" and got[2]["scheduled_at"] == "2026-06-01T10:02:00.000Z"
        assert got[2]["reason"] == "held back by overlap: queue"

        async def queue_empty():
            return (await call(client, "GET", "/v1/schedules/hold"))["queued"] == 0
        await eventually(queue_empty, "the queue to be empty")  # the row commits with the record, and is read just after


async def test_overlap_cancel_previous_cancels_the_open_run_and_starts_anew(tmp_path):
    clock = ManualClock(at("2026-06-01T10:00:30"))
    async with serving(make_settings(tmp_path, overlapping("cancel_previous")), clock) as client:
        got = await _two_fires(client, clock, "hold")
        assert [f["outcome"] for f in got] == ["started", "started"]
        first = await call(client, "GET", f"/v1/runs/{got[0]['run_id']}/wait?timeout=5")
        assert first["status"] == "cancelled"
        second = await call(client, "GET", f"/v1/runs/{got[1]['run_id']}")
        assert second["status"] == "running"


# --- operations --------------------------------------------------------------------------


async def test_pause_resume_and_run_now_are_audited(tmp_path):
    files = {"tick": workflow("tick", "every: {interval: 1m}")}
    clock = ManualClock(at("2026-06-01T10:00:30"))
    async with serving(make_settings(tmp_path, files), clock) as client:
        paused = await call(client, "POST", "/v1/schedules/tick/pause", json={"note": "freeze"})
        assert paused["paused"] is True and paused["pause_note"] == "freeze"

        async def idle():  # the scheduler saw the pause: it sleeps its idle hour, not until 10:01
            return at("2026-06-01T10:00:30") + IDLE_S in clock.sleepers
        await eventually(idle, "the scheduler to go idle")
        clock.set(at("2026-06-01T10:03:30"))  # three ticks pass while paused
        started = await call(client, "POST", "/v1/schedules/tick/run", expect=201)
        run = await call(client, "GET", f"/v1/runs/{started['run_id']}/wait?timeout=5")
        assert run["status"] == "succeeded"
        got = await fires(client, "tick")
        assert [(f["outcome"], f["manual"]) for f in got] == [("started", True)]  # nothing fired in the pause
        resumed = await call(client, "POST", "/v1/schedules/tick/resume")
        assert resumed["paused"] is False
        assert resumed["next_fires"][0]["at"] == "2026-06-01T10:04:00.000Z"
        got = await step_to(client, clock, "tick", at("2026-06-01T10:04:00"))
        assert [(f["scheduled_at"][11:16], f["manual"]) for f in got] == [("10:03", True), ("10:04", False)]
        audit = await call(client, "GET", "/v1/audit?limit=50")
        actions = [e["action"] for e in audit["entries"]]
        for action in ("pause_schedule", "run_schedule", "resume_schedule", "schedule.created"):
            assert action in actions
        await call(client, "POST", "/v1/schedules/nope/pause", expect=404)


async def test_list_shows_next_fires_in_zone_and_utc_and_the_last_outcome(tmp_path):
    files = {"stop": workflow("stop", "cron: {name: stop-dev-envs, schedule: '0 19 * * MON-FRI', timezone: America/Los_Angeles}")}
    clock = ManualClock(at("2026-11-20T18:00", "America/Los_Angeles"))  # a Friday
    async with serving(make_settings(tmp_path, files), clock) as client:
        body = await call(client, "GET", "/v1/schedules")
        (view,) = body["schedules"]
        assert view["name"] == "stop-dev-envs" and view["workflow"] == "stop"
        assert [f["local"] for f in view["next_fires"]] == [
            "2026-11-20T19:00:00-08:00", "2026-11-23T19:00:00-08:00", "2026-11-24T19:00:00-08:00",
            "2026-11-25T19:00:00-08:00", "2026-11-26T19:00:00-08:00"]
        assert view["next_fires"][0]["at"] == "2026-11-21T03:00:00.000Z"
        assert view["last_outcome"] is None
        await step_to(client, clock, "stop-dev-envs", at("2026-11-20T19:00", "America/Los_Angeles"))
        view = await call(client, "GET", "/v1/schedules/stop-dev-envs")
        assert view["last_outcome"] == "started" and view["last_fire_at"] == "2026-11-21T03:00:00.000Z"
        # every answer matches the model its OpenAPI entry documents
        ScheduleList.model_validate(await call(client, "GET", "/v1/schedules"))
        ScheduleView.model_validate(view)
        FirePage.model_validate(await call(client, "GET", "/v1/schedules/stop-dev-envs/fires"))
        ScheduleRunStarted.model_validate(await call(client, "POST", "/v1/schedules/stop-dev-envs/run", expect=201))
        CalendarList.model_validate(await call(client, "GET", "/v1/calendars"))
        assert iso(runtime_of(client).scheduler.clock.now()) == "2026-11-21T03:00:00.000Z"


async def test_fire_records_page_newest_first(tmp_path):
    files = {"tick": workflow("tick", "every: {interval: 1m}")}
    clock = ManualClock(at("2026-06-01T10:00:30"))
    async with serving(make_settings(tmp_path, files), clock) as client:
        await step_to(client, clock, "tick", at("2026-06-01T10:05:00"))
        first = await call(client, "GET", "/v1/schedules/tick/fires?limit=3")
        assert [f["scheduled_at"][11:16] for f in first["fires"]] == ["10:05", "10:04", "10:03"]
        rest = await call(client, "GET", f"/v1/schedules/tick/fires?limit=3&cursor={first['next_cursor']}")
        assert [f["scheduled_at"][11:16] for f in rest["fires"]] == ["10:02", "10:01"]
        assert rest["next_cursor"] is None
        await call(client, "GET", "/v1/schedules/tick/fires?cursor=x", expect=400)


async def test_jitter_delays_the_start_but_not_the_nominal_time(tmp_path):
    files = {"tick": workflow("tick", "every: {interval: 1m, jitter: 20s}")}
    clock = ManualClock(at("2026-06-01T10:00:30"), jitter=0.5)  # every draw is half the bound: 10 s
    async with serving(make_settings(tmp_path, files), clock) as client:
        await settled(client, clock, "tick")
        clock.set(at("2026-06-01T10:01:05"))  # past the nominal time, before the jittered one

        async def sleeping_until_the_jittered_time():
            return at("2026-06-01T10:01:10") in clock.sleepers
        await eventually(sleeping_until_the_jittered_time, "the scheduler to sleep until 10:01:10")
        assert await fires(client, "tick") == []
        clock.set(at("2026-06-01T10:01:10"))
        (fire,) = await fires_reaching(client, "tick", 1)
        assert fire["scheduled_at"] == "2026-06-01T10:01:00.000Z"
        assert fire["fired_at"] == "2026-06-01T10:01:10.000Z"
        assert fire["missed"] is False
