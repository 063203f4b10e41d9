"""Durable timers: the clock seam, timers driven by a manual clock, and timers that
fall due while the server is down.

* ManualClock on its own: advancing wakes exactly the due sleepers, a wake event
  wins, time never goes back, a cancelled sleeper leaves nothing behind.
* The timer heap against a real SQLite store: refills in full batches, and a timer
  that fired but whose row is not deleted yet is not fired again by a refill.
* The real runtime and API in process with a ManualClock: a one-day sleep, a
  templated wait_until, a retry delay and a signal timeout fire when the test moves
  the clock past their deadline, once, and not before; nothing waits in real time.
* A real server process with the real clock, killed with SIGKILL: 10,000 sleeping
  runs fire exactly once after the restart; a step timeout that expires while the
  server is down fails the step after the restart, and the retry or the saga's
  compensation runs (handler-side logs show what ran).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from server.runtime import timers as timers_module
from server.runtime.clock import ManualClock, SystemClock, iso
from server.runtime.timers import HORIZON_S, Timers
from server.settings import Settings
from server.store.base import Batch, TimerRow
from server.store.sqlite import SQLiteStore
from tests.inproc import api_client, call, eventually, runtime_of
from tests.serverproc import ServerProcess

START = 1_900_000_000.0  # 2030-03-17T17:46:40Z: a fixed moment, nowhere near the machine's clock
DAY_S = 86_400.0
BOUND_S = 10.0  # every in-process wait below is for a condition, bounded by this


async def asleep_until(clock: ManualClock, deadline: float) -> None:
    """Wait until something (the timer loop) sleeps on the clock until exactly `deadline`:
    it has seen the clock's latest move and waits for that moment, not an earlier one."""
    async def check() -> bool:
        return deadline in clock.sleepers
    await eventually(check, f"a sleeper until {deadline}")


# --- ManualClock on its own ----------------------------------------------------------------


async def test_advance_wakes_exactly_the_sleepers_whose_deadline_passed():
    clock = ManualClock(START)
    woke: list[float] = []

    async def sleeper(deadline: float) -> None:
        await clock.sleep_until(deadline, asyncio.Event())
        woke.append(deadline)

    tasks = [asyncio.create_task(sleeper(START + d)) for d in (10, 20, 30)]
    await eventually(_async(lambda: len(clock.sleepers) == 3), "three sleepers")
    clock.advance(20)
    await eventually(_async(lambda: len(woke) == 2), "the two due sleepers")
    assert woke == [START + 10, START + 20]
    assert clock.sleepers == [START + 30] and clock.now() == START + 20
    clock.set(START + 30)  # exactly the deadline is due
    await asyncio.gather(*tasks)
    assert woke == [START + 10, START + 20, START + 30] and clock.sleepers == []


async def test_a_wake_event_wins_over_a_far_deadline_and_stays_set():
    clock = ManualClock(START)
    wake = asyncio.Event()
    task = asyncio.create_task(clock.sleep_until(START + DAY_S, wake))
    await eventually(_async(lambda: clock.sleepers == [START + DAY_S]), "the sleeper")
    wake.set()
    await asyncio.wait_for(task, BOUND_S)
    assert wake.is_set() and clock.now() == START and clock.sleepers == []
    await clock.sleep_until(START + DAY_S, wake)  # already set: returns at once
    await clock.sleep_until(START - 1, asyncio.Event())  # already due: returns at once


def test_the_clock_never_moves_back_and_jitter_is_fixed_or_seeded():
    clock = ManualClock(START, jitter=0.25)
    with pytest.raises(ValueError, match="only moves forward"):
        clock.advance(-1)
    with pytest.raises(ValueError, match="only moves forward"):
        clock.set(START - 0.001)
    clock.set(START)  # standing still is fine
    assert clock.now() == START and clock.jitter() == 0.25
    seeded = [ManualClock(0, seed=3).jitter() for _ in range(2)]
    assert seeded[0] == seeded[1] and 0 <= seeded[0] < 1
    with pytest.raises(ValueError, match="jitter"):
        ManualClock(0, jitter=1.0)


async def test_a_cancelled_sleeper_leaves_nothing_behind():
    clock = ManualClock(START)
    wake = asyncio.Event()
    before = asyncio.all_tasks()
    task = asyncio.create_task(clock.sleep_until(START + 5, wake))
    await eventually(_async(lambda: clock.sleepers == [START + 5]), "the sleeper")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert clock.sleepers == []
    assert asyncio.all_tasks() == before  # no helper task outlives it
    assert not wake._waiters  # nor a future parked on the event
    clock.advance(10)  # nothing left to wake, nothing to trip over


async def test_moving_the_clock_twice_before_a_sleeper_resumes_is_harmless():
    clock = ManualClock(START)
    task = asyncio.create_task(clock.sleep_until(START + 1, asyncio.Event()))
    await eventually(_async(lambda: clock.sleepers == [START + 1]), "the sleeper")
    clock.advance(1)
    clock.advance(1)  # the sleeper has not run since the first move
    await asyncio.wait_for(task, BOUND_S)


async def test_system_clock_sleeps_until_a_deadline_or_the_wake_event():
    clock = SystemClock()
    wake = asyncio.Event()
    deadline = clock.now() + 0.05
    await clock.sleep_until(deadline, wake)
    assert clock.now() >= deadline
    task = asyncio.create_task(clock.sleep_until(clock.now() + 3600, wake))
    await asyncio.sleep(0)  # one turn of the loop: the task runs to its wait
    assert not task.done()  # so it is the event, not an early return, that ends it
    wake.set()
    await asyncio.wait_for(task, BOUND_S)
    task = asyncio.create_task(clock.sleep_until(clock.now() + 3600, asyncio.Event()))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def _async(fn):
    async def predicate() -> Any:
        return fn()
    return predicate


# --- the timer heap against a real store -----------------------------------------------------




async def test_refills_in_full_batches_fire_every_timer_once_in_order(store, monkeypatch):
    monkeypatch.setattr(timers_module, "REFILL_BATCH", 4)  # 10 near timers: three reads
    await store.commit(Batch(timers_set=[TimerRow(f"r{i}", "sleep:a", START + 10 + i) for i in range(10)]))
    clock = ManualClock(START)
    fired: list[str] = []
    timers = Timers(store, clock, lambda run_id, timer_id: fired.append(run_id))
    await timers.start()
    try:
        assert len(timers) == 4  # one batch in memory
        # more may be near than the batch held: it reads again a little later, not in a busy loop
        await asleep_until(clock, START + timers_module.FULL_REFILL_GAP_S)
        for i in range(10):
            clock.set(START + 10 + i)
            # fired, and the refill that follows the firing is done (the loop sleeps again): a
            # refill still reading while the delete below commits could hand the row back
            await eventually(_async(lambda: len(fired) == i + 1 and clock.sleepers), f"timer r{i}")
            # the firing's commit deletes the row, then the runtime settles it
            await store.commit(Batch(timers_deleted=[(f"r{i}", "sleep:a")]))
            timers.settled([(f"r{i}", "sleep:a")])
            clock.advance(timers_module.FULL_REFILL_GAP_S / 2)
        clock.advance(HORIZON_S)
        await asleep_until(clock, clock.now() + HORIZON_S / 2)  # idle: only the next refill ahead
        assert fired == [f"r{i}" for i in range(10)]
    finally:
        await timers.stop()


async def test_a_refill_does_not_fire_again_a_timer_whose_firing_is_not_settled_yet(store):
    await store.commit(Batch(timers_set=[TimerRow("r1", "sleep:a", START + 10)]))
    clock = ManualClock(START)
    fired: list[str] = []
    timers = Timers(store, clock, lambda run_id, timer_id: fired.append(run_id))
    await timers.start()
    try:
        clock.advance(10)
        await eventually(_async(lambda: fired == ["r1"]), "the firing")
        clock.advance(HORIZON_S)  # a refill reads the row again: the runtime has not committed its delete yet
        await asleep_until(clock, clock.now() + HORIZON_S / 2)
        assert fired == ["r1"]
        # Settled, and the row is still there: its commit failed. The next refill fires it again.
        timers.settled([("r1", "sleep:a")])
        clock.advance(HORIZON_S)
        await eventually(_async(lambda: fired == ["r1", "r1"]), "the repeat after a lost commit")
    finally:
        await timers.stop()


async def test_a_timer_disarmed_before_it_is_due_never_fires(store):
    clock = ManualClock(START)
    fired: list[str] = []
    timers = Timers(store, clock, lambda run_id, timer_id: fired.append(run_id))
    await timers.start()
    try:
        await store.commit(Batch(timers_set=[TimerRow("r1", "timeout:a:1", START + 30),
                                             TimerRow("r2", "timeout:a:1", START + 40)]))
        timers.arm("r1", "timeout:a:1", START + 30)
        timers.arm("r2", "timeout:a:1", START + 40)
        await store.commit(Batch(timers_deleted=[("r1", "timeout:a:1")]))
        timers.disarm("r1", "timeout:a:1")
        clock.advance(HORIZON_S)
        await eventually(_async(lambda: fired == ["r2"]), "the armed timer")
        await asleep_until(clock, clock.now() + HORIZON_S / 2)
        assert fired == ["r2"]
    finally:
        await timers.stop()


class HeldStore(SQLiteStore):
    """The real store; while `hold` is set, a timer read takes its snapshot and then waits
    for the test, so the test can commit, arm and disarm while a refill is in flight."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.hold: asyncio.Event | None = None
        self.held = asyncio.Event()

    async def due_timers(self, until: float, limit: int) -> list[TimerRow]:
        rows = await super().due_timers(until, limit)
        if self.hold is not None:
            self.held.set()
            await self.hold.wait()
        return rows


@dataclass
class Held:
    """A timer heap (not started) on a HeldStore and a manual clock; `fired` lists run ids."""

    store: HeldStore
    clock: ManualClock
    timers: Timers
    fired: list[str]


@pytest.fixture
async def held(tmp_path: Path):
    store = HeldStore(tmp_path / "held.db")
    await store.open()
    fired: list[str] = []
    clock = ManualClock(START)
    timers = Timers(store, clock, lambda run_id, timer_id: fired.append(run_id))
    try:
        yield Held(store, clock, timers, fired)
    finally:
        await timers.stop()
        await store.close()


async def test_timers_armed_or_disarmed_while_a_refill_reads_are_neither_lost_nor_revived(held):
    store, clock, timers, fired = held.store, held.clock, held.timers, held.fired
    await timers.start()
    later = START + DAY_S
    await store.commit(Batch(timers_set=[TimerRow("cancelled", "sleep:a", later + 5)]))  # far: store only
    store.hold = asyncio.Event()
    clock.advance(DAY_S)  # the refill's snapshot holds "cancelled"
    await asyncio.wait_for(store.held.wait(), BOUND_S)
    await store.commit(Batch(timers_deleted=[("cancelled", "sleep:a")],
                             timers_set=[TimerRow("new", "retry:a", later + 10)]))
    timers.disarm("cancelled", "sleep:a")
    timers.arm("new", "retry:a", later + 10)  # beyond the old horizon, and not in the snapshot
    store.hold.set()
    store.hold = None
    await asleep_until(clock, later + 10)  # "new" is in memory, not left for the next refill
    clock.advance(10)
    await eventually(_async(lambda: fired == ["new"]), "the timer armed during the refill")
    await asleep_until(clock, clock.now() + HORIZON_S / 2 - 10)  # idle; "cancelled" never came back
    assert fired == ["new"]


async def test_a_firing_settled_during_a_refill_is_not_fired_again(held):
    store, clock, timers, fired = held.store, held.clock, held.timers, held.fired
    await store.commit(Batch(timers_set=[TimerRow("r1", "sleep:a", START + 10)]))
    await timers.start()
    clock.advance(10)
    await eventually(_async(lambda: fired == ["r1"]), "the firing")
    store.hold = asyncio.Event()
    clock.set(START + HORIZON_S / 2)  # the next refill reads r1's row: not deleted yet
    await asyncio.wait_for(store.held.wait(), BOUND_S)
    await store.commit(Batch(timers_deleted=[("r1", "sleep:a")]))  # the runtime commits the firing
    timers.settled([("r1", "sleep:a")])
    store.hold.set()
    store.hold = None
    await asleep_until(clock, clock.now() + HORIZON_S / 2)
    assert fired == ["r1"]


# --- the runtime in process, on a manual clock -------------------------------------------------

NAP = """\
name: nap
steps:
  - id: nap
    sleep: 1d
  - id: after
    task: echo
    input: {woke: true}
"""

APPOINTMENT = """\
name: appointment
steps:
  - id: until
    wait_until: "{{ input.at }}"
  - id: after
    task: echo
    input: {at: "{{ input.at }}"}
"""

FLAKY = """\
name: flaky
steps:
  - id: call
    task: timer.fail_first
    input: {path: "{{ input.path }}"}
    retry: {max_attempts: 2, initial_delay: 1h, max_delay: 1h}
"""

GATE = """\
name: gate
steps:
  - id: wait
    wait_for_signal: {signal: go, timeout: 90s, on_timeout: ON_TIMEOUT}
  - id: after
    task: echo
    input: {went: on}
"""


def manual_settings(tmp_path: Path) -> Settings:
    wf = tmp_path / "wf"
    wf.mkdir(exist_ok=True)
    for name, text in (("nap", NAP), ("appointment", APPOINTMENT), ("flaky", FLAKY),
                       ("gate", GATE.replace("ON_TIMEOUT", "continue")),
                       ("strict-gate", GATE.replace("name: gate", "name: strict-gate").replace("ON_TIMEOUT", "fail"))):
        (wf / f"{name}.yaml").write_text(text)
    return Settings(data_dir=tmp_path / "data", workflows=[wf], handler_modules=["tests.timer_handlers"],
                    auth={"enabled": False}, nats={"enabled": False}, limits={"shutdown_grace_s": 0.2})


@pytest.fixture
def settings(tmp_path, monkeypatch) -> Settings:
    monkeypatch.chdir(tmp_path)  # keep the repository's config/baton.yaml out of it
    return manual_settings(tmp_path)


async def start(client, workflow: str, input: Any = None) -> str:  # noqa: A002
    run = await call(client, "POST", f"/v1/workflows/{workflow}/runs", 201, json={"input": input or {}})
    return run["run_id"]


async def step_status(client, run_id: str, step: str) -> str:
    detail = await call(client, "GET", f"/v1/runs/{run_id}")
    return next(s["status"] for s in detail["steps"] if s["step_id"] == step)


async def step_in(client, run_id: str, step: str, status: str) -> None:
    async def check() -> bool:
        return await step_status(client, run_id, step) == status
    await eventually(check, f"step {step} of {run_id} to be {status}")


async def finished(client, run_id: str) -> dict[str, Any]:
    return await call(client, "GET", f"/v1/runs/{run_id}/wait?timeout={BOUND_S:g}")


async def history_types(client, run_id: str) -> list[str]:
    return [h["type"] for h in (await call(client, "GET", f"/v1/runs/{run_id}/history"))["events"]]


async def test_a_one_day_sleep_fires_once_when_the_clock_passes_it_and_not_before(settings):
    clock = ManualClock(START, jitter=0.5)
    async with api_client(settings, clock) as client:
        run_id = await start(client, "nap")
        await step_in(client, run_id, "nap", "waiting")

        clock.advance(DAY_S - 1)
        await asleep_until(clock, START + DAY_S)  # the timer loop loaded it and waits for its moment
        assert await step_status(client, run_id, "nap") == "waiting"
        assert "timer.fired" not in await history_types(client, run_id)

        clock.advance(1)
        done = await finished(client, run_id)
        assert done["status"] == "succeeded", done
        detail = await call(client, "GET", f"/v1/runs/{run_id}")
        assert detail["steps"][0]["finished_at"] == iso(START + DAY_S)  # fired at the clock's moment
        assert detail["output"] == {"woke": True}
        assert (await history_types(client, run_id)).count("timer.fired") == 1
        assert not runtime_of(client).timers._fired  # the pump settled the firing once it was committed


async def test_wait_until_a_templated_moment_fires_at_exactly_that_moment(settings):
    clock = ManualClock(START, jitter=0.5)
    at = START + 2 * 3600
    async with api_client(settings, clock) as client:
        run_id = await start(client, "appointment", {"at": iso(at)})
        await step_in(client, run_id, "until", "waiting")

        clock.set(at - 0.5)
        await asleep_until(clock, at)
        assert await step_status(client, run_id, "until") == "waiting"

        clock.set(at)
        done = await finished(client, run_id)
        assert done["status"] == "succeeded", done
        assert done["finished_at"] == iso(at)
        assert (await history_types(client, run_id)).count("timer.fired") == 1


async def test_a_retry_waits_its_delay_on_the_clock(settings, tmp_path):
    clock = ManualClock(START, jitter=0.5)  # 0.5: the plain delay, no spread
    calls = tmp_path / "calls.txt"
    async with api_client(settings, clock) as client:
        run_id = await start(client, "flaky", {"path": str(calls)})
        await step_in(client, run_id, "call", "retrying")
        history = (await call(client, "GET", f"/v1/runs/{run_id}/history"))["events"]
        assert [h["data"]["delay_s"] for h in history if h["type"] == "step.retrying"] == [3600]

        clock.advance(3599)
        await asleep_until(clock, START + 3600)
        assert await step_status(client, run_id, "call") == "retrying"
        assert len(calls.read_text().splitlines()) == 1

        clock.advance(1)
        done = await finished(client, run_id)
        assert done["status"] == "succeeded", done
    assert [line.split()[2] for line in calls.read_text().splitlines()] == ["1", "2"]


async def test_a_signal_timeout_continues_or_fails_when_the_clock_passes_it(settings):
    clock = ManualClock(START, jitter=0.5)
    async with api_client(settings, clock) as client:
        lenient, strict = await start(client, "gate"), await start(client, "strict-gate")
        for run_id in (lenient, strict):
            await step_in(client, run_id, "wait", "waiting")

        clock.advance(89)  # within the horizon: the timer went straight into the heap
        await asleep_until(clock, START + 90)
        assert await step_status(client, lenient, "wait") == "waiting"

        clock.advance(1)
        done = await finished(client, lenient)
        assert done["status"] == "succeeded", done
        failed = await finished(client, strict)
        assert failed["status"] == "failed", failed
        detail = await call(client, "GET", f"/v1/runs/{strict}")
        assert detail["error"]["type"] == "SignalTimeout"
        assert "step.timed_out" in await history_types(client, lenient)


# --- a real server process, SIGKILLed while its runs sleep --------------------------------------

ALARM = """\
name: NAME
steps:
  - id: nap
    wait_until: "{{ input.at }}"
  - id: ring
    task: timer.record
    input: {path: "{{ input.path }}"}
"""
ALARMS = 10_000
START_IN_FLIGHT = 64  # concurrent POSTs: enough for group commit to batch, few enough for one client loop
# The alarms all fall due at one moment, which must come after the last of them is
# committed (and the server killed). How long starting takes depends on the machine, so
# a first batch of runs that sleep for a day measures it: the lead is that estimate,
# with room to spare. Those runs also show that timers far ahead stay asleep across
# the restart.
SNOOZES = 1000
LEAD_FACTOR = 2.0  # survives the machine getting twice as busy between the estimate and the starts
LEAD_PAD_S = 3.0
RING_BOUND_S = 90.0


async def start_runs(url: str, workflow: str, count: int, body: dict[str, Any]) -> list[str]:
    """POST `count` runs, at most START_IN_FLIGHT at once; every one must be accepted (201)."""
    gate = asyncio.Semaphore(START_IN_FLIGHT)
    timeout = aiohttp.ClientTimeout(total=30)

    async def one(http: aiohttp.ClientSession) -> str:
        async with gate:
            async with http.post(f"{url}/v1/workflows/{workflow}/runs", json={"input": body}) as resp:
                run = await resp.json()
                assert resp.status == 201, run
                return run["run_id"]

    connector = aiohttp.TCPConnector(limit=START_IN_FLIGHT)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        return await asyncio.gather(*(one(http) for _ in range(count)))


def lines_of(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def wait_past(moment: float) -> None:
    """Wait (bounded by the moment itself) until the wall clock has passed `moment`."""
    while (left_s := moment - time.time()) > 0:
        time.sleep(min(left_s, 0.1))


def running(server: ServerProcess, workflow: str) -> list[dict[str, Any]]:
    return server.request("GET", f"/v1/runs?workflow={workflow}&status=running&limit=1")[1]["runs"]


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_ten_thousand_sleeping_runs_survive_sigkill_and_fire_exactly_once(tmp_path):
    wf = tmp_path / "wf"
    wf.mkdir()
    (wf / "alarm.yaml").write_text(ALARM.replace("NAME", "alarm"))
    (wf / "snooze.yaml").write_text(ALARM.replace("NAME", "snooze"))
    rings = tmp_path / "rings.txt"
    server = ServerProcess(tmp_path / "data", wf, ["tests.timer_handlers"])
    server.start()
    try:
        t0 = time.time()
        asyncio.run(start_runs(server.url, "snooze", SNOOZES, {"at": t0 + DAY_S, "path": str(rings)}))
        lead_s = (time.time() - t0) / SNOOZES * ALARMS * LEAD_FACTOR + LEAD_PAD_S
        due = time.time() + lead_s
        run_ids = asyncio.run(start_runs(server.url, "alarm", ALARMS, {"at": due, "path": str(rings)}))
        server.kill()
        killed_at = time.time()
        assert killed_at < due, (f"starting {ALARMS} runs and the kill took longer than the {lead_s:.1f}s estimated"
                                 f" from the first {SNOOZES}: some fell due before the kill")
        assert not rings.exists()  # none fired before the kill
        wait_past(due + 0.5)
        server.start()
        server.wait_for(lambda: len(lines_of(rings)) >= ALARMS, f"{ALARMS} rings", timeout_s=RING_BOUND_S,
                        interval_s=0.2)
        server.wait_for(lambda: running(server, "alarm") == [], "every alarm to end", timeout_s=RING_BOUND_S,
                        interval_s=0.2)
        assert server.stop() == 0
    finally:
        server.stop()

    rung = lines_of(rings)
    assert len(rung) == ALARMS and {r[0] for r in rung} == set(run_ids)  # each exactly once, handler-side
    assert {(r[1], r[2]) for r in rung} == {("ring", "1")}
    db = sqlite3.connect(f"file:{tmp_path / 'data' / 'baton.db'}?mode=ro", uri=True)
    try:
        statuses = set(db.execute("SELECT workflow, status, count(*) FROM runs GROUP BY workflow, status"))
        fired = db.execute("SELECT run_id, count(*), min(at) FROM history WHERE type = 'timer.fired'"
                           " GROUP BY run_id").fetchall()
        left = set(db.execute("SELECT timer_id, count(*) FROM timers GROUP BY timer_id"))
    finally:
        db.close()
    assert statuses == {("alarm", "succeeded", ALARMS), ("snooze", "running", SNOOZES)}
    assert {run_id for run_id, _, _ in fired} == set(run_ids)  # store side: every alarm fired ...
    assert {count for _, count, _ in fired} == {1}  # ... once
    assert min(at for _, _, at in fired) > killed_at  # and every firing was the restarted server's
    assert left == {("sleep:nap", SNOOZES)}  # the snoozes' timers, a day ahead, still wait


SLOWPOKE = """\
name: {name}
steps:
  - id: book
    task: timer.record
    input: {{path: "{{{{ input.path }}}}", label: book}}
    compensate: {{task: timer.record, input: {{path: "{{{{ input.path }}}}", label: unbook}}}}
  - id: slow
    task: timer.hang_first
    input: {{path: "{{{{ input.path }}}}"}}
    timeout: {timeout_s}s
    retry: {{max_attempts: {attempts}, initial_delay: 0.1}}
"""
STEP_TIMEOUT_S = 3  # the kill must come before it; the wait for it is the test's real time


def kill_while_the_step_times_out(tmp_path: Path, attempts: int) -> tuple[dict, list[list[str]], list[dict], float, float]:
    """Start a run whose `slow` step hangs, SIGKILL the server while it hangs, restart it
    once the step's timeout has passed. Returns the run's end, the handler log (`run step
    attempt label` lines), the run's history, when the server was killed and when it was
    started again."""
    wf = tmp_path / "wf"
    wf.mkdir()
    (wf / "slowpoke.yaml").write_text(SLOWPOKE.format(name="slowpoke", timeout_s=STEP_TIMEOUT_S, attempts=attempts))
    calls = tmp_path / "calls.txt"
    server = ServerProcess(tmp_path / "data", wf, ["tests.timer_handlers"])
    server.start()
    try:
        status, run = server.request("POST", "/v1/workflows/slowpoke/runs", {"input": {"path": str(calls)}})
        assert status == 201, run
        run_id = run["run_id"]
        server.wait_for(lambda: ["slow", "1"] in [line[1:3] for line in lines_of(calls)], "the slow step to hang")
        slow = server.request("GET", f"/v1/runs/{run_id}")[1]["steps"][1]
        server.kill()
        killed_at = time.time()
        times_out_at = parse_iso(slow["started_at"]) + STEP_TIMEOUT_S
        assert killed_at < times_out_at, "the server was killed after the step's timeout: the test proves nothing"
        wait_past(times_out_at + 0.2)
        restarted_at = time.time()
        server.start()
        status, done = server.request("GET", f"/v1/runs/{run_id}/wait?timeout=15", timeout_s=20)
        assert status == 200, done
        history = server.request("GET", f"/v1/runs/{run_id}/history")[1]["events"]
    finally:
        server.stop()
    return done, lines_of(calls), history, killed_at, restarted_at


def parse_iso(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def due_while_down(history: list[dict], timer_id: str, killed_at: float, restarted_at: float) -> bool:
    """The timer was armed once, for a moment while the server was down: the restart
    fired the original deadline, it did not arm a fresh timeout for the re-run attempt."""
    armed = [h["data"]["fire_at"] for h in history if h["type"] == "timer.started" and h["data"]["timer_id"] == timer_id]
    return len(armed) == 1 and killed_at < armed[0] < restarted_at


def fired_after(history: list[dict], timer_id: str, moment: float) -> bool:
    return any(h["type"] == "timer.fired" and h["data"]["timer_id"] == timer_id and parse_iso(h["at"]) > moment
               for h in history)


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_step_timeout_that_expires_while_the_server_is_down_fails_the_attempt_and_the_retry_runs(tmp_path):
    done, calls, history, killed_at, restarted_at = kill_while_the_step_times_out(tmp_path, attempts=2)
    assert done["status"] == "succeeded", done
    # book once; attempt 1 of slow before the kill and again after the restart (same attempt,
    # at least once), until the timeout ended it; then attempt 2, the retry, which succeeded
    assert [line[1:] for line in calls] == [["book", "1", "book"], ["slow", "1", "-"], ["slow", "1", "-"],
                                             ["slow", "2", "-"]]
    assert due_while_down(history, "timeout:slow:1", killed_at, restarted_at)
    assert fired_after(history, "timeout:slow:1", killed_at)  # the restarted server fired it
    retrying = [h for h in history if h["type"] == "step.retrying"]
    assert len(retrying) == 1 and retrying[0]["data"]["error"]["type"] == "Timeout"


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_step_timeout_that_expires_while_the_server_is_down_compensates_the_run(tmp_path):
    done, calls, history, killed_at, restarted_at = kill_while_the_step_times_out(tmp_path, attempts=1)
    assert done["status"] == "compensated", done
    assert [line[1:] for line in calls] == [["book", "1", "book"], ["slow", "1", "-"], ["slow", "1", "-"],
                                             ["book", "1", "unbook"]]
    assert due_while_down(history, "timeout:slow:1", killed_at, restarted_at)
    assert fired_after(history, "timeout:slow:1", killed_at)
    failed = [h for h in history if h["type"] == "step.failed"]
    assert len(failed) == 1 and failed[0]["data"]["type"] == "Timeout"
