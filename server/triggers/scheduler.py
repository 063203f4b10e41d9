"""The scheduler: starts the runs of cron and interval triggers, durably.

    loop: sleep (on the runtime's clock) until the earliest due schedule
          ──> plan its due fires (server/triggers/schedules.py: calendars, on_missed)
          ──> for each fire to start: check `overlap` against the schedule's last run,
              start the run under the id the fire derives
          ──> commit the schedule's new position and its fire records, together

Durability: the row in `schedules` says which fire comes next. A crash after a run
was started but before the row moved on fires that tick again after the restart,
and `start_run` finds the run already stored under the tick's id: no tick starts
two runs. A restart after downtime finds `next_at` in the past; the fires since
then are planned as missed (on_missed) unless they are less than
`misfire_grace_s` (plus the trigger's jitter) late.

Operators pause and resume a schedule (a paused one starts nothing; on resume it
continues from the next fire after now, so what fell in the pause is not run) or
fire it now (a manual run ignores `overlap`, and becomes the run the next fire's
overlap check looks at). The API records these in the audit log.

One asyncio lock serialises the loop's fires and the operators' calls, so a pause
never interleaves with a fire of the same schedule. On replicas an operator may pause
on another replica than the time leader: a pause writes only the pause columns and a
fire never writes them, so neither undoes the other; a fire the leader had already
begun may still start its run, the later ones do not.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable
from dataclasses import replace
from datetime import datetime
from typing import Any

import orjson

from server.definitions.calendars import compile_calendars
from server.definitions.catalog import Catalog
from server.definitions.loader import problem_at
from server.definitions.models import SCHEDULE_KINDS
from server.errors import BatonError, Conflict, DefinitionError, ExpressionError, NotFound, StoreError, Unavailable
from server.runtime.audit import SYSTEM, audit_row
from server.runtime.clock import Clock, iso
from server.settings import Settings
from server.store.base import TERMINAL, Batch, ScheduleFireRow, ScheduleRow, Store
from server.triggers.schedules import Fire, Schedule, ScheduleError, compile_schedule, describe, schedule_name

log = logging.getLogger("baton.schedules")

# Fires held back by `overlap: queue` behind one long run; beyond this, fires are skipped.
MAX_QUEUED = 100
# Shown by GET /v1/schedules.
UPCOMING = 5
# The loop looks again at least this often, whatever it expects (clock jumps, lost wake-ups).
IDLE_S = 3600.0
RETRY_S = 5.0  # after a failed commit or start


class ScheduleNotFound(NotFound):
    code = "schedule_not_found"


def compile_schedules(catalog: Catalog, settings: Settings) -> dict[str, Schedule]:
    """Every schedule trigger of the latest version of each workflow; DefinitionError lists every problem."""
    calendars = compile_calendars(dict(settings.calendars))
    schedules: dict[str, Schedule] = {}
    problems: list[str] = []
    for name in catalog.names():
        loaded = catalog.latest(name)
        specs = [(i, t.schedule) for i, t in enumerate(loaded.model.triggers) if t.schedule is not None]
        for ordinal, (index, spec) in enumerate(specs, start=1):
            kind = next(k for k in SCHEDULE_KINDS if getattr(loaded.model.triggers[index], k) is not None)
            sname = schedule_name(name, ordinal, len(specs), spec)
            if sname in schedules:
                problems.append(problem_at(loaded, ("triggers", index, kind), f"schedule name {sname!r} is already "
                                           f"used by workflow {schedules[sname].workflow!r}; give one of them a `name`"))
                continue
            try:
                schedules[sname] = compile_schedule(sname, name, index, spec, calendars)
            except ScheduleError as exc:
                problems.append(problem_at(loaded, ("triggers", index, kind, exc.field), exc.message))
    if problems:
        raise DefinitionError(problems)
    return schedules


class Scheduler:
    def __init__(self, runtime: Any, store: Store, schedules: dict[str, Schedule], settings: Settings,
                 clock: Clock) -> None:
        self.runtime, self.store, self.clock = runtime, store, clock
        self.schedules = schedules
        self.calendars = compile_calendars(dict(settings.calendars))
        self.grace_s = settings.schedules.misfire_grace_s
        self.keep_fires = settings.schedules.keep_fires
        self._rows: dict[str, ScheduleRow] = {}
        self._offsets: dict[str, float] = {}  # the jitter drawn for each schedule's next fire
        self._last_runs: dict[str, str] = {}  # run id -> schedule, for runs an overlap policy waits on
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        # replicas (server/cluster.py): the time leader's lease, which every commit here must
        # still hold; and how often the schedules are read again, since other replicas may
        # pause one or end the run an overlap policy waits on. None: this process alone.
        self.fence: tuple[str, str, int] | None = None
        self.refresh_s: float | None = None

    # ------------------------------------------------------------ lifecycle

    async def load(self) -> None:
        """Read where the schedules stand, to answer for them without firing them (a replica
        that is not the time leader)."""
        stored = {row.name: row for row in await self.store.list_schedules()}
        self._rows = {name: stored[name] for name in self.schedules if name in stored}

    async def start(self) -> None:
        self._stopping = False
        now = self.clock.now()
        stored = {row.name: row for row in await self.store.list_schedules()}
        batch = Batch()
        for name, schedule in self.schedules.items():
            row = stored.get(name)
            spec_hash = schedule.spec_hash
            if row is not None and row.spec_hash == spec_hash and row.workflow == schedule.workflow:
                self._rows[name] = row
                continue
            # new, or its times changed: it starts from now; nothing before counts as missed
            action = "schedule.created" if row is None else "schedule.changed"
            fresh = ScheduleRow(name, schedule.workflow, spec_hash, schedule.next_after(now), False, None, None,
                                None, None, None, None, b"[]", now)
            if row is not None:  # an operator's pause and the run the overlap policy waits on survive a change
                fresh = replace(fresh, paused=row.paused, paused_by=row.paused_by, paused_at=row.paused_at,
                                pause_note=row.pause_note, last_fire_at=row.last_fire_at,
                                last_run_id=row.last_run_id, last_outcome=row.last_outcome, queued=row.queued)
            self._rows[name] = fresh
            batch.schedules.append(fresh)
            batch.audit.append(audit_row(now, SYSTEM, action, target=f"schedule:{name}", detail={
                "workflow": schedule.workflow, "kind": schedule.kind, "schedule": schedule.text,
                "timezone": schedule.spec.timezone, "next_at": iso(fresh.next_at)}))
        if batch.schedules:
            await self.store.commit(batch)
        for name, row in self._rows.items():
            self._draw_offset(name)
            if row.last_run_id is not None:
                self._last_runs[row.last_run_id] = name
        self.runtime.run_finished.append(self._run_finished)
        self._task = asyncio.create_task(self._loop(), name="baton-scheduler")
        log.info("scheduler started: %d schedules", len(self.schedules))

    async def stop(self) -> None:
        if self._task is None:
            return
        self._stopping = True
        self._wake.set()
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        if self._run_finished in self.runtime.run_finished:
            self.runtime.run_finished.remove(self._run_finished)

    def _run_finished(self, run_id: str) -> None:
        """Called by the runtime after a run's end is committed: a queued fire may go now."""
        name = self._last_runs.get(run_id)
        if name is not None and orjson.loads(self._rows[name].queued):
            self._wake.set()

    # ------------------------------------------------------------------ loop

    async def _loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                failed = await self._tick()
            except Exception:  # a bug must not end scheduling for good
                log.exception("scheduler tick failed; trying again in %.0fs", RETRY_S)
                failed = True
            if failed:  # what failed is still due: back off instead of spinning on it
                await self.clock.sleep_until(self.clock.now() + RETRY_S, self._wake)
                continue
            await self.clock.sleep_until(self._next_deadline(), self._wake)

    async def _tick(self) -> bool:
        """Fire what is due. Several schedules due at once (after a restart, say) go in the
        order of the last fire each will start, so of a missed 19:00 stop and a missed
        07:00 start, the start is started last. True if some schedule failed."""
        async with self._lock:
            if self.refresh_s is not None:
                stored = {row.name: row for row in await self.store.list_schedules()}
                self._rows.update((name, row) for name, row in stored.items() if name in self._rows)
            now = self.clock.now()
            due: list[tuple[float, str, list[Fire], float | None]] = []
            for name, row in self._rows.items():
                if name not in self.schedules or row.paused:
                    continue
                schedule = self.schedules[name]
                if row.next_at is not None and row.next_at + self._offsets.get(name, 0.0) <= now:
                    fires, next_at = schedule.plan(row.next_at, now, self.grace_s + schedule.spec.jitter)
                    last = max((f.scheduled_at for f in fires if f.action == "start"), default=row.next_at)
                    due.append((last, name, fires, next_at))
            failed = False
            for _, name, fires, next_at in sorted(due, key=lambda d: (d[0], d[1])):
                if self._stopping:
                    return False
                failed |= not await self._guarded(name, self._fire(self.schedules[name], self._rows[name],
                                                                   fires, next_at, now))
            # after the due fires, which may have joined a queue whose run has ended
            held = [name for name, row in self._rows.items()
                    if name in self.schedules and not row.paused and orjson.loads(row.queued)]
            for name in held:
                failed |= not await self._guarded(name, self._release_queued(self.schedules[name], self._rows[name]))
            return failed

    async def _guarded(self, name: str, work: Awaitable[None]) -> bool:
        """One schedule's fire; a failure (the store, a bug) is logged and leaves that
        schedule where it was, to be tried again, without holding up the others."""
        try:
            await work
            return True
        except Exception as exc:
            if isinstance(exc, BatonError):
                log.error("schedule %s: %s; trying again in %.0fs", name, exc.message, RETRY_S)
            else:
                log.exception("schedule %s failed; trying again in %.0fs", name, RETRY_S)
            return False

    def _next_deadline(self) -> float:
        now = self.clock.now()
        deadline = now + (self.refresh_s or IDLE_S)
        for name, row in self._rows.items():
            if row.paused or row.next_at is None or name not in self.schedules:
                continue
            deadline = min(deadline, row.next_at + self._offsets.get(name, 0.0))
        return deadline

    def _draw_offset(self, name: str) -> None:
        schedule = self.schedules.get(name)
        jitter_s = schedule.spec.jitter if schedule is not None else 0.0
        self._offsets[name] = jitter_s * self.clock.jitter() if jitter_s else 0.0

    # ----------------------------------------------------------------- fires

    async def _fire(self, schedule: Schedule, row: ScheduleRow, fires: list[Fire], next_at: float | None,
                    now: float) -> None:
        batch = Batch()
        for fire in fires:
            if fire.action == "skip" and fire.missed and fire.count == 1 and \
                    await self.store.get_run(schedule.run_id(fire.scheduled_at)) is not None:
                # started before a crash cut the commit of this row short, and now too late to
                # count as on time: record the run it has (and let overlap see it), not a skip
                row = await self._start(batch, schedule, row, fire.scheduled_at, now, missed=True)
            elif fire.action == "skip":
                row = self._record(batch, row, schedule, fire.scheduled_at, now, "skipped", fire.reason,
                                   missed=fire.missed, count=fire.count)
            else:
                row = await self._start_or_hold(batch, schedule, row, fire.scheduled_at, now, missed=fire.missed)
        await self._commit(batch, replace(row, next_at=next_at, updated_at=now))
        self._draw_offset(schedule.name)

    async def _release_queued(self, schedule: Schedule, row: ScheduleRow) -> None:
        """Start the oldest fire `overlap: queue` held back, once the run it waited for has ended."""
        if await self._open_run(row) is not None:
            return
        queued = orjson.loads(row.queued)
        now = self.clock.now()
        batch = Batch()
        row = replace(row, queued=orjson.dumps(queued[1:]))
        row = await self._start(batch, schedule, row, queued[0], now, reason="held back by overlap: queue")
        await self._commit(batch, replace(row, updated_at=now))

    async def _start_or_hold(self, batch: Batch, schedule: Schedule, row: ScheduleRow, scheduled_at: float,
                             now: float, *, missed: bool) -> ScheduleRow:
        """Apply `overlap`, then start (or hold back, or skip) one fire."""
        overlap = schedule.spec.overlap
        if overlap != "allow" and (await self.store.get_run(schedule.run_id(scheduled_at))) is None:
            previous = await self._open_run(row)
            # a queue goes in order: with fires held back already, this one waits behind them
            # even when the run they waited for has ended (the tick releases the oldest next)
            queued = orjson.loads(row.queued) if overlap == "queue" else []
            if previous is not None or queued:
                prev_id, status = previous or (None, None)
                waits_for = f"run {prev_id}" if prev_id is not None else "the fires queued before it"
                if overlap == "skip":
                    return self._record(batch, row, schedule, scheduled_at, now, "skipped",
                                        f"run {prev_id} of the previous fire is still {status} (overlap: skip)",
                                        missed=missed)
                if overlap == "queue":
                    if len(queued) >= MAX_QUEUED:
                        return self._record(batch, row, schedule, scheduled_at, now, "skipped",
                                            f"{MAX_QUEUED} fires already wait for {waits_for} (overlap: queue)",
                                            missed=missed)
                    row = replace(row, queued=orjson.dumps([*queued, scheduled_at]))
                    return self._record(batch, row, schedule, scheduled_at, now, "queued",
                                        f"waits for {waits_for} to end (overlap: queue)", missed=missed)
                if overlap == "cancel_previous":
                    await self._cancel(prev_id, f"superseded by the {iso(scheduled_at)} fire of schedule {schedule.name!r}",
                                       schedule.name)
        return await self._start(batch, schedule, row, scheduled_at, now, missed=missed)

    async def _start(self, batch: Batch, schedule: Schedule, row: ScheduleRow, scheduled_at: float, now: float, *,
                     missed: bool = False, manual: bool = False, by: str | None = None,
                     reason: str | None = None) -> ScheduleRow:
        event = schedule.event(scheduled_at, now, missed=missed, manual=manual, by=by)
        run_id = uuid.uuid4().hex if manual else schedule.run_id(scheduled_at)
        try:
            input, workflow_id = schedule.render(event)
            summary, created = await self.runtime.start_run(
                schedule.workflow, input, workflow_id=workflow_id, event=event, run_id=run_id,
                by=by or f"schedule:{schedule.name}")
        except (Unavailable, StoreError):
            raise  # shutting down or the store is failing: this fire is retried, not recorded as failed
        except ExpressionError as exc:
            return self._record(batch, row, schedule, scheduled_at, now, "failed", f"template: {exc.message}",
                                missed=missed, manual=manual, actor=by)
        except BatonError as exc:
            return self._record(batch, row, schedule, scheduled_at, now, "failed", exc.message,
                                missed=missed, manual=manual, actor=by)
        if not created and summary["run_id"] != run_id:
            # `workflow_id` names a run that is still open: starting is refused by the id's rule
            return self._record(batch, row, schedule, scheduled_at, now, "skipped",
                                f"workflow_id {workflow_id!r} is already open in run {summary['run_id']}",
                                missed=missed, manual=manual, actor=by)
        if not created:
            reason = "started before a restart"
        if row.last_run_id is not None:
            self._last_runs.pop(row.last_run_id, None)
        self._last_runs[summary["run_id"]] = schedule.name
        row = replace(row, last_run_id=summary["run_id"])
        return self._record(batch, row, schedule, scheduled_at, now, "started", reason, run_id=summary["run_id"],
                            missed=missed, manual=manual, actor=by)

    async def _open_run(self, row: ScheduleRow) -> tuple[str, str] | None:
        if row.last_run_id is None:
            return None
        run = await self.store.get_run(row.last_run_id)
        if run is None or run.status in TERMINAL:
            return None
        return run.run_id, run.status

    async def _cancel(self, run_id: str, reason: str, name: str) -> None:
        try:
            await self.runtime.cancel(run_id, reason=reason, by=f"schedule:{name}")
        except Conflict:
            pass  # it ended meanwhile
        # the new run does not wait for the old one's compensations: cancel_previous means "stop it", not "after it"

    def _record(self, batch: Batch, row: ScheduleRow, schedule: Schedule, scheduled_at: float, now: float,
                outcome: str, reason: str | None, *, run_id: str | None = None, missed: bool = False,
                manual: bool = False, count: int = 1, actor: str | None = None) -> ScheduleRow:
        batch.schedule_fires.append(ScheduleFireRow(None, schedule.name, scheduled_at, now, outcome, reason, run_id,
                                                    missed, manual, count, actor))
        if outcome == "failed":
            log.warning("schedule %s: the %s fire failed: %s", schedule.name, iso(scheduled_at), reason)
        if manual:
            return replace(row, last_outcome=outcome)
        return replace(row, last_fire_at=scheduled_at, last_outcome=outcome)

    async def _commit(self, batch: Batch, row: ScheduleRow, *, pause: bool = False) -> None:
        """Write `row` with what `batch` holds; `pause`: only its pause columns (and next_at
        on a resume), which a fire never writes, so neither undoes the other on replicas."""
        (batch.schedule_pauses if pause else batch.schedules).append(row)
        batch.schedule_fires_pruned.append((row.name, self.keep_fires))
        batch.fence = self.fence
        await self.store.commit(batch)
        self._rows[row.name] = row
        self.runtime.metrics.schedule_fired(batch.schedule_fires)

    # ------------------------------------------------------------ operations

    def _get(self, name: str) -> Schedule:
        schedule = self.schedules.get(name)
        if schedule is None:
            known = ", ".join(sorted(self.schedules)) or "none"
            raise ScheduleNotFound(f"unknown schedule {name!r} (known: {known})", field="name")
        return schedule

    async def pause(self, name: str, *, by: str, note: str | None = None) -> dict[str, Any]:
        schedule = self._get(name)
        async with self._lock:
            row = self._rows[name]
            if not row.paused:
                now = self.clock.now()
                await self._commit(Batch(), replace(row, paused=True, paused_by=by, paused_at=now, pause_note=note,
                                                    updated_at=now), pause=True)
        self._wake.set()
        return self.view(schedule)

    async def resume(self, name: str, *, by: str) -> dict[str, Any]:
        schedule = self._get(name)
        async with self._lock:
            row = self._rows[name]
            if row.paused:
                now = self.clock.now()
                # what fell in the pause is not run: the schedule goes on from the next fire after now
                await self._commit(Batch(), replace(row, paused=False, paused_by=None, paused_at=None,
                                                    pause_note=None, next_at=schedule.next_after(now), updated_at=now),
                                   pause=True)
                self._draw_offset(name)
        self._wake.set()
        return self.view(schedule)

    async def run_now(self, name: str, *, by: str) -> dict[str, Any]:
        """Fire the schedule once, now: a manual run, whatever its calendars, pause or overlap say."""
        schedule = self._get(name)
        async with self._lock:
            now = self.clock.now()
            batch = Batch()
            row = await self._start(batch, schedule, self._rows[name], now, now, manual=True, by=by)
            await self._commit(batch, replace(row, updated_at=now))
            record = batch.schedule_fires[-1]
        if record.outcome != "started":
            raise Conflict(f"schedule {name!r} did not start a run: {record.reason}", field="name")
        return {"schedule": name, "run_id": record.run_id, "scheduled_at": iso(now)}

    # ----------------------------------------------------------------- views

    def list(self) -> list[dict[str, Any]]:
        return [self.view(self.schedules[name]) for name in sorted(self.schedules)]

    def get(self, name: str) -> dict[str, Any]:
        return self.view(self._get(name))

    def view(self, schedule: Schedule) -> dict[str, Any]:
        row = self._rows.get(schedule.name)
        now = self.clock.now()
        spec = schedule.spec
        start_from = now if row is None or row.next_at is None or row.paused else min(now, row.next_at - 1e-6)
        upcoming = [] if row is not None and row.next_at is None else schedule.upcoming(start_from, UPCOMING)
        return {
            "name": schedule.name,
            "workflow": schedule.workflow,
            "kind": schedule.kind,
            "schedule": schedule.text,
            "description": describe(schedule),
            "timezone": spec.timezone,
            "paused": bool(row and row.paused),
            "paused_by": row.paused_by if row else None,
            "paused_at": iso(row.paused_at) if row else None,
            "pause_note": row.pause_note if row else None,
            "next_fires": [{"at": iso(ts), "local": datetime.fromtimestamp(ts, schedule.tz).isoformat(),
                            "skip": schedule.blocked(ts)} for ts in upcoming],
            "last_fire_at": iso(row.last_fire_at) if row else None,
            "last_outcome": row.last_outcome if row else None,
            "last_run_id": row.last_run_id if row else None,
            "queued": len(orjson.loads(row.queued)) if row else 0,
            "on_missed": spec.on_missed,
            "max_catch_up": spec.max_catch_up if spec.on_missed == "catch_up" else None,
            "overlap": spec.overlap,
            "jitter_s": spec.jitter,
            "exclude": list(spec.exclude),
            "only_within": list(spec.only_within),
            "start": iso(schedule.start_s),
            "end": iso(schedule.end_s),
        }

    async def fires(self, name: str, *, limit: int = 50, before_id: int | None = None) -> list[dict[str, Any]]:
        self._get(name)
        rows = await self.store.list_schedule_fires(name, limit=limit, before_id=before_id)
        return [fire_view(r) for r in rows]


def fire_view(row: ScheduleFireRow) -> dict[str, Any]:
    return {"id": row.id, "scheduled_at": iso(row.scheduled_at), "fired_at": iso(row.fired_at),
            "outcome": row.outcome, "reason": row.reason, "run_id": row.run_id, "missed": row.missed,
            "manual": row.manual, "count": row.count, "by": row.actor}
