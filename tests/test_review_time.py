"""Regressions found in review of the scheduler and the durable timers.

* A fire whose run was started just before a crash cut the commit of the schedule's
  row short, and that is past the misfire grace when the server is back, is recorded
  as the run it has, and `overlap` sees that run (no second run beside it).
* `overlap: queue` starts the held fires in order: a fire due once the previous run
  has ended still waits behind the fires queued before it.
* Fire records page like every other list: no cursor after the last page.
"""

from __future__ import annotations

import pytest

from server.errors import StoreError
from server.runtime.clock import ManualClock
from tests.inproc import call, eventually, runtime_of
from tests.test_durable_timers import _async
from tests.test_scheduler import (
    WAITS_FOR_SIGNAL, at, fires, fires_reaching, make_settings, serving, settled, step_to, workflow,
)


async def test_a_fire_started_before_a_crash_and_missed_after_it_keeps_its_run(tmp_path, monkeypatch):
    files = {"hold": workflow("hold", "every: {interval: 1m, overlap: skip, on_missed: skip}", WAITS_FOR_SIGNAL)}
    settings = make_settings(tmp_path, files, schedules={"misfire_grace_s": 10})
    clock = ManualClock(at("2026-06-01T10:00:30"))
    async with serving(settings, clock) as client:
        scheduler = runtime_of(client).scheduler
        tried: list[bool] = []

        async def crash(*args, **kwargs):  # the process dies between the run's commit and the row's
            tried.append(True)
            raise StoreError("the process died here")
        monkeypatch.setattr(scheduler, "_commit", crash)
        clock.set(at("2026-06-01T10:01:00"))
        await eventually(_async(lambda: tried), "the fire to start its run and fail its commit")
        (run,) = (await call(client, "GET", "/v1/runs?workflow=hold"))["runs"]
    # back at 10:05:30: 10:01 ... 10:05 are all past the grace
    clock = ManualClock(at("2026-06-01T10:05:30"))
    async with serving(settings, clock) as client:
        got = await fires_reaching(client, "hold", 5)
        first = got[0]
        assert (first["scheduled_at"][11:16], first["outcome"], first["run_id"]) == ("10:01", "started", run["run_id"])
        assert [f["outcome"] for f in got[1:]] == ["skipped"] * 4
        view = await call(client, "GET", "/v1/schedules/hold")
        assert view["last_run_id"] == run["run_id"]
        # the run of 10:01 still waits for its signal: overlap: skip skips 10:06
        got = await step_to(client, clock, "hold", at("2026-06-01T10:06:00"))
        assert got[-1]["outcome"] == "skipped"
        assert got[-1]["reason"] == f"run {run['run_id']} of the previous fire is still running (overlap: skip)"
        runs = (await call(client, "GET", "/v1/runs?workflow=hold"))["runs"]
        assert [r["run_id"] for r in runs] == [run["run_id"]]


async def test_overlap_queue_starts_held_fires_before_a_later_one(tmp_path):
    files = {"hold": workflow("hold", "every: {interval: 1m, overlap: queue}", WAITS_FOR_SIGNAL)}
    clock = ManualClock(at("2026-06-01T10:00:30"))
    async with serving(make_settings(tmp_path, files), clock) as client:
        await step_to(client, clock, "hold", at("2026-06-01T10:01:00"))
        got = await step_to(client, clock, "hold", at("2026-06-01T10:02:00"))
        assert [f["outcome"] for f in got] == ["started", "queued"]
        scheduler = runtime_of(client).scheduler
        # the run of 10:01 ends while the 10:03 fire comes due, before the scheduler looks again
        async with scheduler._lock:
            await call(client, "POST", f"/v1/runs/{got[0]['run_id']}/signals/go", expect=202, json={})
            await call(client, "GET", f"/v1/runs/{got[0]['run_id']}/wait?timeout=5")
            clock.set(at("2026-06-01T10:03:05"))
        await settled(client, clock, "hold")  # 10:03 is handled ...
        async with scheduler._lock:  # ... and so is the rest of that tick
            got = await fires(client, "hold")
        assert [(f["scheduled_at"][11:16], f["outcome"]) for f in got] == [
            ("10:01", "started"), ("10:02", "queued"), ("10:03", "queued"), ("10:02", "started")]
        assert got[2]["reason"] == "waits for the fires queued before it to end (overlap: queue)"
        assert (await call(client, "GET", "/v1/schedules/hold"))["queued"] == 1
        runs = (await call(client, "GET", "/v1/runs?workflow=hold&status=running"))["runs"]
        assert len(runs) == 1


@pytest.mark.parametrize("count, pages", [(3, [3]), (4, [3, 1])])
async def test_fire_records_give_no_cursor_after_the_last_page(tmp_path, count, pages):
    files = {"tick": workflow("tick", "every: {interval: 1m}")}
    clock = ManualClock(at("2026-06-01T10:00:30"))
    async with serving(make_settings(tmp_path, files), clock) as client:
        await step_to(client, clock, "tick", at("2026-06-01T10:00:00") + 60 * count)
        assert len(await fires(client, "tick")) == count
        sizes, cursor = [], ""
        while True:
            page = await call(client, "GET", f"/v1/schedules/tick/fires?limit=3{cursor}")
            sizes.append(len(page["fires"]))
            if page["next_cursor"] is None:
                break
            cursor = f"&cursor={page['next_cursor']}"
        assert sizes == pages
