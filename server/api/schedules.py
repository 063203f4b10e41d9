"""`/v1/schedules`: cron and interval triggers, their fires, pause / resume / run now.

Reads need the viewer role; pausing, resuming and firing need operator. Every call
that changes something lands in the audit log (server/api/audit.py), with who.
"""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, Field

from server.api import schemas
from server.api.audit import note
from server.api.auth import caller_name
from server.api.routes import CURSOR, LIMIT, _orch, json_response
from server.api.table import Route
from server.api.views import Timestamp
from server.definitions.calendars import describe as describe_calendar
from server.errors import Unavailable
from server.store.base import parse_id


def _scheduler(request: web.Request) -> Any:
    scheduler = _orch(request).scheduler
    if scheduler is None:
        raise Unavailable("the scheduler is not running")
    return scheduler


async def list_schedules(request: web.Request) -> web.Response:
    return json_response({"schedules": _scheduler(request).list()})


async def get_schedule(request: web.Request) -> web.Response:
    return json_response(_scheduler(request).get(request.match_info["name"]))


async def list_schedule_fires(request: web.Request) -> web.Response:
    q = request.query
    limit = schemas.query_int(q, "limit", schemas.DEFAULT_LIST_LIMIT, 1, schemas.MAX_LIST_LIMIT)
    cursor = q.get("cursor") or None
    before_id = parse_id(cursor, "cursor") if cursor is not None else None
    # one more than asked for tells whether another page follows (no cursor to an empty page)
    fires = await _scheduler(request).fires(request.match_info["name"], limit=limit + 1, before_id=before_id)
    more = len(fires) > limit
    del fires[limit:]
    next_cursor = str(fires[-1]["id"]) if more else None
    return json_response({"fires": fires, "next_cursor": next_cursor})


async def pause_schedule(request: web.Request) -> web.Response:
    body = schemas.parse_body(PauseRequest, await request.read(), optional=True)
    name = request.match_info["name"]
    note(request, schedule=name)
    view = await _scheduler(request).pause(name, by=caller_name(request) or "anonymous", note=body.note)
    return json_response(view)


async def resume_schedule(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    note(request, schedule=name)
    return json_response(await _scheduler(request).resume(name, by=caller_name(request) or "anonymous"))


async def run_schedule(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    note(request, schedule=name)
    started = await _scheduler(request).run_now(name, by=caller_name(request) or "anonymous")
    note(request, run_id=started["run_id"])
    return json_response(started, status=201)


async def list_calendars(request: web.Request) -> web.Response:
    scheduler = _scheduler(request)
    now = scheduler.clock.now()
    calendars = [
        {"name": cal.name, "timezone": cal.spec.timezone, "description": cal.spec.description,
         "entries": describe_calendar(cal.spec), "now": cal.why(now)}
        for cal in scheduler.calendars.values()
    ]
    return json_response({"calendars": calendars})


# --- request and response models -------------------------------------------------


class PauseRequest(BaseModel):
    model_config = {"extra": "forbid"}
    note: str | None = Field(None, max_length=500, description="Why, for whoever looks next")


class FireTime(BaseModel):
    at: Timestamp = Field(description="UTC")
    local: str = Field(description="In the schedule's time zone, with its offset")
    skip: str | None = Field(description="Why this fire would start no run (a calendar), or null")


class ScheduleView(BaseModel):
    name: str
    workflow: str
    kind: Literal["cron", "every"]
    schedule: str = Field(description="The cron expression, or the interval (`15m`)")
    description: str
    timezone: str
    paused: bool
    paused_by: str | None
    paused_at: Timestamp | None
    pause_note: str | None
    next_fires: list[FireTime] = Field(description="The next 5 nominal fire times (jitter not included)")
    last_fire_at: Timestamp | None = Field(description="Nominal time of the last fire handled")
    last_outcome: Literal["started", "skipped", "queued", "failed"] | None
    last_run_id: str | None
    queued: int = Field(description="Fires held back by `overlap: queue`")
    on_missed: Literal["skip", "run_once", "catch_up"]
    max_catch_up: int | None
    overlap: Literal["allow", "skip", "queue", "cancel_previous"]
    jitter_s: float
    exclude: list[str]
    only_within: list[str]
    start: Timestamp | None
    end: Timestamp | None


class ScheduleList(BaseModel):
    schedules: list[ScheduleView]


class FireView(BaseModel):
    id: int
    scheduled_at: Timestamp = Field(description="The nominal fire time")
    fired_at: Timestamp = Field(description="When Baton handled it")
    outcome: Literal["started", "skipped", "queued", "failed"]
    reason: str | None
    run_id: str | None
    missed: bool = Field(description="Handled after Baton was down or stalled (on_missed applied)")
    manual: bool
    count: int = Field(description="More than 1: one record standing for that many skipped fires")
    by: str | None


class FirePage(BaseModel):
    fires: list[FireView]
    next_cursor: str | None


class ScheduleRunStarted(BaseModel):
    schedule: str
    run_id: str
    scheduled_at: Timestamp


class CalendarView(BaseModel):
    name: str
    timezone: str
    description: str
    entries: list[str] = Field(description="The calendar's days and windows, in words")
    now: str | None = Field(description="Why this moment is in the calendar, or null if it is not")


class CalendarList(BaseModel):
    calendars: list[CalendarView]


ROUTES: list[Route] = [
    Route("GET", "/v1/schedules", list_schedules, "viewer",
          "List schedules with their next 5 fire times (own zone and UTC), last fire and outcome", "schedules",
          responses={200: ScheduleList}),
    Route("GET", "/v1/schedules/{name}", get_schedule, "viewer", "One schedule", "schedules",
          responses={200: ScheduleView}),
    Route("GET", "/v1/schedules/{name}/fires", list_schedule_fires, "viewer",
          "A schedule's fires, newest first: the runs started, and why others were skipped", "schedules",
          responses={200: FirePage}, params=(LIMIT, CURSOR)),
    Route("POST", "/v1/schedules/{name}/pause", pause_schedule, "operator",
          "Pause a schedule: it starts nothing until resumed", "schedules",
          body=PauseRequest, body_required=False, responses={200: ScheduleView}),
    Route("POST", "/v1/schedules/{name}/resume", resume_schedule, "operator",
          "Resume a schedule from its next fire after now (fires during the pause are not run)", "schedules",
          responses={200: ScheduleView}),
    Route("POST", "/v1/schedules/{name}/run", run_schedule, "operator",
          "Start a run of the schedule now (ignores pause, calendars and overlap)", "schedules",
          responses={201: ScheduleRunStarted, 409: None}),
    Route("GET", "/v1/calendars", list_calendars, "viewer",
          "List calendars and whether this moment is in each", "schedules",
          responses={200: CalendarList}),
]
