"""Schedules, compiled: when cron and interval triggers fire, and what a due fire does.

Pure: every instant comes in as Unix seconds, so tests walk schedules across DST
changes and months without waiting. The scheduler (server/triggers/scheduler.py)
does the I/O.

Rules:

1. Cron expressions are read by cronsim in the schedule's `timezone`, with Debian
   cron's DST behaviour:
   * a time that does not exist (spring forward: 02:30 in Europe/Berlin on the last
     Sunday of March) fires once, at the first valid instant after the gap (03:00);
   * a time that occurs twice (fall back) fires once, at its first occurrence;
   * expressions whose minute or hour field starts with `*` (`*/15 * * * *`, and
     `*/30 2 * * *` too) follow real time instead: every 15 minutes of the repeated
     hour fire, and none are invented for the skipped hour. So do expressions with
     a seconds field (six fields).
2. `every` fires at `start + k × interval` (start defaults to the Unix epoch), in
   real seconds, unaffected by DST.
3. `start` and `end` bound the fires, both inclusive; a date `end` includes that day.
4. A fire in an `exclude` calendar, or outside every `only_within` calendar, is
   skipped with that reason. Calendars are checked at the nominal fire time.
5. Fires more than the grace period behind "now" are missed (Baton was down or
   stalled) and follow `on_missed`, after the calendars have had their say:
   `skip` records them; `run_once` starts one run for the latest (none if an on-time
   fire is due as well); `catch_up` starts runs for the latest `max_catch_up`, oldest
   first, and records the rest as skipped.
6. A fire's run id derives from (schedule, nominal time): firing the same tick again
   after a crash finds the run it already started.
"""

from __future__ import annotations

import hashlib
import math
from collections import deque
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

import orjson
from cronsim import CronSim

from server.definitions.calendars import Calendar
from server.definitions.cron import cron_expression, zone
from server.definitions.expressions import Template
from server.definitions.models import CronTrigger, EveryTrigger
from server.errors import ExpressionError
from server.runtime.clock import iso

# Cron iteration costs ~10 µs a fire; after this many, a scan jumps to the last day
# before "now" (a seconds-level cron down for weeks) rather than walk every second.
MAX_SCAN = 100_000
SCAN_TAIL_S = 86400.0
# Skipped missed fires recorded one by one, newest first; older ones share one summary record.
MAX_RECORDED_MISSED = 100
FIRE_EVENT_TYPE = "baton.schedule.fired"


@dataclass(frozen=True)
class Fire:
    """What to do with one due fire: start a run, or record why not."""

    scheduled_at: float
    action: Literal["start", "skip"]
    reason: str | None = None
    missed: bool = False
    count: int = 1  # a summary record stands for this many skipped fires


@dataclass(frozen=True)
class Schedule:
    name: str
    workflow: str
    index: int  # the trigger's position in the workflow's `triggers`
    kind: Literal["cron", "every"]
    spec: CronTrigger | EveryTrigger
    tz: ZoneInfo
    expr: str | None  # cron, macros expanded
    interval_s: float | None
    start_s: float | None
    end_s: float | None
    exclude: tuple[Calendar, ...]
    only_within: tuple[Calendar, ...]
    input: Template | None
    workflow_id: Template | None

    # ------------------------------------------------------------ fire times

    @property
    def text(self) -> str:
        return self.spec.schedule if isinstance(self.spec, CronTrigger) else _duration_text(self.spec.interval)

    @property
    def spec_hash(self) -> str:
        """Changes when the fire times would (not when the input does)."""
        timing = self.spec.model_dump(mode="json", include={"schedule", "interval", "timezone", "start", "end"})
        return hashlib.sha256(orjson.dumps(timing, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]

    def next_after(self, ts: float) -> float | None:
        """The first fire strictly after `ts` (and not before `start`), or None if the schedule has ended."""
        fire = self._next_cron(ts) if self.expr is not None else self._tick(max(self._index_at_or_before(ts), -1) + 1)
        if fire is None or (self.end_s is not None and fire > self.end_s):
            return None
        return fire

    def _next_cron(self, ts: float) -> float | None:
        # cronsim counts whole seconds from where it starts, and for fixed-time jobs it
        # walks local wall time (Debian's DST rule): started inside the second pass of a
        # repeated hour it yields the first pass's fire, which is already behind `ts`.
        # So start a second early (whole seconds: a `start` that is itself a fire time
        # must fire) and take the first fire past both `ts` and `start`.
        begin = ts if self.start_s is None else max(ts, self.start_s - 1.0)
        for local in CronSim(self.expr, datetime.fromtimestamp(math.floor(begin), self.tz)):
            fire = local.timestamp()
            if fire > ts and (self.start_s is None or fire >= self.start_s):
                return fire
        return None  # cronsim found no fire within 50 years

    def _tick(self, k: int) -> float:
        # every interval fire time is computed this one way, so a tick is the same float
        # whichever path found it (run ids hash it)
        return (self.start_s or 0.0) + k * self.interval_s

    def _index_at_or_before(self, ts: float) -> int:
        """The last k with `_tick(k) <= ts` (negative before `start`)."""
        k = math.floor((ts - (self.start_s or 0.0)) / self.interval_s)
        # the division may land one off near an exact tick; the tick itself decides
        while self._tick(k) > ts:
            k -= 1
        while self._tick(k + 1) <= ts:
            k += 1
        return k

    def upcoming(self, after: float, count: int) -> list[float]:
        fires: list[float] = []
        ts = after
        while len(fires) < count and (fire := self.next_after(ts)) is not None:
            fires.append(fire)
            ts = fire
        return fires

    def due(self, first: float, now: float, keep: int) -> tuple[list[float], int]:
        """The fires from `first` (inclusive, itself a fire time) to `now`: the latest
        `keep` of them, oldest first, and how many came before those."""
        if self.interval_s is not None and self.expr is None:
            return self._due_every(first, now, keep)
        kept: deque[float] = deque(maxlen=keep)
        total = 0
        fire: float | None = first
        while fire is not None and fire <= now:
            kept.append(fire)
            total += 1
            if total % MAX_SCAN == 0 and now - fire > SCAN_TAIL_S:
                # too many to walk: jump ahead; the count stays a lower bound of what was missed
                total += 1
                fire = self.next_after(now - SCAN_TAIL_S)
                continue
            fire = self.next_after(fire)
        return list(kept), total - len(kept)

    def _due_every(self, first: float, now: float, keep: int) -> tuple[list[float], int]:
        last = now if self.end_s is None else min(now, self.end_s)
        lo = self._index_at_or_before(first)
        if self._tick(lo) < first:
            lo += 1
        if self.start_s is not None:
            lo = max(lo, 0)
        total = self._index_at_or_before(last) - lo + 1
        if total <= 0:
            return [], 0
        shown = min(total, keep)
        fires = [self._tick(lo + total - shown + i) for i in range(shown)]
        return fires, total - shown

    # ------------------------------------------------------------- calendars

    def blocked(self, ts: float) -> str | None:
        """Why a fire at `ts` must not start a run (a calendar says so), or None."""
        for cal in self.exclude:
            why = cal.why(ts)
            if why is not None:
                return f"excluded by calendar {cal.name!r}: {why}"
        if self.only_within and not any(cal.contains(ts) for cal in self.only_within):
            names = ", ".join(repr(c.name) for c in self.only_within)
            return f"outside calendar {names}" if len(self.only_within) == 1 else f"outside calendars {names}"
        return None

    # ----------------------------------------------------------- due fires

    def plan(self, first: float, now: float, grace_s: float) -> tuple[list[Fire], float | None]:
        """What to do with every fire from `first` to `now`, and the next fire after them."""
        keep = max(self.spec.max_catch_up, MAX_RECORDED_MISSED) + 1
        fires, earlier = self.due(first, now, keep)
        return plan_fires(self, fires, earlier, now, grace_s, first=first), self.next_after(now)

    # --------------------------------------------------------------- a fire

    def run_id(self, scheduled_at: float) -> str:
        key = f"schedule\n{self.name}\n{scheduled_at!r}\n{self.workflow}\n{self.index}"
        return hashlib.sha256(key.encode()).hexdigest()[:32]

    def event(self, scheduled_at: float, fired_at: float, *, missed: bool = False, manual: bool = False,
              by: str | None = None) -> dict[str, Any]:
        """The CloudEvent a fire hands its run (history keeps it; templates see it as `event`)."""
        local = datetime.fromtimestamp(scheduled_at, self.tz)
        data: dict[str, Any] = {
            "schedule": self.name, "scheduled_at": iso(scheduled_at), "scheduled_local": local.isoformat(),
            "timezone": self.spec.timezone, "fired_at": iso(fired_at), "missed": missed, "manual": manual,
        }
        if by is not None:
            data["by"] = by
        return {
            "specversion": "1.0", "id": f"{self.name}@{iso(scheduled_at)}" + (f"/manual@{iso(fired_at)}" if manual else ""),
            "source": f"/baton/schedules/{self.name}", "type": FIRE_EVENT_TYPE, "time": iso(fired_at),
            "datacontenttype": "application/json", "data": data,
        }

    def render(self, event: dict[str, Any]) -> tuple[Any, str | None]:
        """The run's input and workflow_id; ExpressionError if a template fails."""
        input = {} if self.input is None else self.input.render({"event": event})
        if self.workflow_id is None:
            return input, None
        wid = self.workflow_id.render({"event": event})
        return input, (None if wid is None or wid == "" else str(wid))


def plan_fires(schedule: Schedule, fires: list[float], earlier: int, now: float, grace_s: float, *,
               first: float | None = None) -> list[Fire]:
    """Rules 4 and 5 over the due fires (oldest first); `earlier` more came before them,
    from `first` on (the summary record is dated there)."""
    spec = schedule.spec
    out: list[Fire] = []
    candidates: list[float] = []
    for ts in fires:
        reason = schedule.blocked(ts)
        if reason is not None:
            out.append(Fire(ts, "skip", reason, missed=now - ts > grace_s))
        else:
            candidates.append(ts)
    missed = [ts for ts in candidates if now - ts > grace_s]
    on_time = [ts for ts in candidates if now - ts <= grace_s]
    if spec.on_missed == "catch_up":
        run_missed = missed[-spec.max_catch_up:]
        why = f"missed; catch_up starts only the latest {spec.max_catch_up} (max_catch_up)"
    elif spec.on_missed == "run_once" and not on_time:
        run_missed = missed[-1:]
        why = "missed; run_once starts only the latest missed fire"
    elif spec.on_missed == "run_once":
        run_missed = []
        why = "missed; run_once runs the fire that is due now instead"
    else:
        run_missed = []
        why = "missed while Baton was not running (on_missed: skip)"
    started = set(run_missed)
    for ts in missed:
        out.append(Fire(ts, "start", missed=True) if ts in started else Fire(ts, "skip", why, missed=True))
    out += [Fire(ts, "start") for ts in on_time]
    out.sort(key=lambda f: f.scheduled_at)
    skipped_missed = [f for f in out if f.action == "skip" and f.missed]
    if earlier or len(skipped_missed) > MAX_RECORDED_MISSED:
        # keep the newest records; one summary stands for the older ones
        folded = skipped_missed[:max(0, len(skipped_missed) - MAX_RECORDED_MISSED)]
        gone = set(folded)
        out = [f for f in out if f not in gone]
        count = earlier + len(folded)
        # dated at the oldest fire it stands for, not at a fire that has a record of its own
        if earlier and first is not None:
            since = first
        else:
            since = folded[0].scheduled_at if folded else (fires[0] if fires else now)
        out.insert(0, Fire(since, "skip", f"{count} earlier fires missed while Baton was not running", missed=True, count=count))
    return out


# ------------------------------------------------------------------ compile


class ScheduleError(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field, self.message = field, message


def schedule_name(workflow: str, ordinal: int, total: int, spec: CronTrigger | EveryTrigger) -> str:
    if spec.name is not None:
        return spec.name
    return workflow if total == 1 else f"{workflow}#{ordinal}"


def compile_schedule(name: str, workflow: str, index: int, spec: CronTrigger | EveryTrigger,
                     calendars: dict[str, Calendar]) -> Schedule:
    """ScheduleError names the part that is wrong (an unknown calendar, a bad template)."""
    for part in ("exclude", "only_within"):
        for cal in getattr(spec, part):
            if cal not in calendars:
                known = ", ".join(sorted(calendars)) or "none are configured (see `calendars` in baton.yaml)"
                raise ScheduleError(part, f"unknown calendar {cal!r} (known: {known})")
    templates: dict[str, Template | None] = {}
    for part in ("input", "workflow_id"):
        source = getattr(spec, part)
        try:
            templates[part] = None if source is None else Template(source)
        except ExpressionError as exc:
            raise ScheduleError(part, exc.message) from None
    tz = zone(spec.timezone)
    is_cron = isinstance(spec, CronTrigger)
    return Schedule(
        name=name, workflow=workflow, index=index, kind="cron" if is_cron else "every", spec=spec, tz=tz,
        expr=cron_expression(spec.schedule) if is_cron else None,
        interval_s=None if is_cron else spec.interval,
        start_s=None if spec.start is None else _instant(spec.start, tz, end=False),
        end_s=None if spec.end is None else _instant(spec.end, tz, end=True),
        exclude=tuple(calendars[c] for c in spec.exclude),
        only_within=tuple(calendars[c] for c in spec.only_within),
        input=templates["input"], workflow_id=templates["workflow_id"],
    )


def _instant(value: date | datetime, tz: ZoneInfo, *, end: bool) -> float:
    if isinstance(value, datetime):
        return value.replace(tzinfo=tz).timestamp()
    day = datetime(value.year, value.month, value.day, tzinfo=tz)
    if end:  # the whole day: up to, not including, the next local midnight
        nxt = day + timedelta(days=1)
        return math.nextafter(datetime(nxt.year, nxt.month, nxt.day, tzinfo=tz).timestamp(), -math.inf)
    return day.timestamp()


def _duration_text(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def describe(schedule: Schedule) -> str:
    """In words: "At 19:00 on Monday through Friday (America/Los_Angeles)" / "every 15m"."""
    if schedule.expr is not None:
        try:
            text = CronSim(schedule.expr, datetime(2001, 1, 1, tzinfo=schedule.tz)).explain()
        except Exception:  # explain() covers the common forms only; the expression itself is always right
            text = schedule.expr
        return f"{text} ({schedule.spec.timezone})"
    return f"every {schedule.text}"
