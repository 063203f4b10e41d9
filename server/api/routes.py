"""The HTTP routes: parse the request, call the orchestrator, serialize. Nothing else.

Errors are raised (BatonError) and turned into responses by the middleware in
`errors.py`, so no route builds an error body by hand.
"""

from __future__ import annotations

import csv
import io
from typing import Any

import orjson
from aiohttp import web

from server.api import schemas, views
from server.api.auth import caller_name
from server.api.table import Param, Route
from server.api.errors import error_response
from server.errors import BadRequest
from server.runtime.base import Orchestrator
from server.telemetry.ids import parse_traceparent
from server.store.base import MAX_ID, parse_id

ORCH = web.AppKey("orch", Orchestrator)
HISTORY_CSV_COLUMNS = ("seq", "at", "type", "key", "data")
NEXT_AFTER = "X-Next-After"  # the CSV page's next_after (a CSV body has no room for it)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def _orch(request: web.Request) -> Orchestrator:
    return request.app[ORCH]


# --- runs -------------------------------------------------------------------------


async def start_run(request: web.Request) -> web.Response:
    body = schemas.parse_body(schemas.StartRun, await request.read())
    run, created = await _orch(request).start_run(
        request.match_info["name"], body.input, workflow_id=body.workflow_id, version=body.version,
        by=caller_name(request), event=caller_trace(request),
    )
    return json_response(run, status=201 if created else 200)


def caller_trace(request: web.Request) -> dict[str, str] | None:
    """The caller's W3C trace context, kept as the run's `event` so the run joins that trace:
    the API request's own span when requests are traced, else the `traceparent` header."""
    from opentelemetry import trace

    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        return {"traceparent": f"00-{span.trace_id:032x}-{span.span_id:016x}-{int(span.trace_flags):02x}"}
    header = request.headers.get("traceparent", "")
    if parse_traceparent(header) is None:
        return None
    context = {"traceparent": header.strip().lower()}
    if request.headers.get("tracestate"):
        context["tracestate"] = request.headers["tracestate"][:512]
    return context


async def list_runs(request: web.Request) -> web.Response:
    q = request.query
    filters = dict(
        workflow=q.get("workflow") or None,
        status=schemas.query_status(q),
        workflow_id=q.get("workflow_id") or None,
        since=schemas.query_timestamp(q, "since"),
        until=schemas.query_timestamp(q, "until"),
        limit=schemas.query_int(q, "limit", schemas.DEFAULT_LIST_LIMIT, 1, schemas.MAX_LIST_LIMIT),
        cursor=q.get("cursor") or None,
    )
    runs, next_cursor = await _orch(request).list_runs(**filters)
    return json_response({"runs": runs, "next_cursor": next_cursor})


async def get_run(request: web.Request) -> web.Response:
    return json_response(await _orch(request).get_run(request.match_info["run_id"]))


async def history(request: web.Request) -> web.Response:
    q = request.query
    fmt = q.get("format") or ("csv" if "text/csv" in request.headers.get("Accept", "") else "json")
    if fmt not in ("json", "csv"):
        raise BadRequest(f"format must be json or csv, got {fmt!r}", field="format")
    run_id = request.match_info["run_id"]
    after_seq = schemas.query_int(q, "after", 0, 0, 2**62)
    limit = schemas.query_int(q, "limit", schemas.DEFAULT_HISTORY_LIMIT, 1, schemas.MAX_HISTORY_LIMIT)
    # one more than asked tells whether another page follows, so a client stops on
    # next_after = null instead of asking once more for an empty page
    events = await _orch(request).history(run_id, after_seq=after_seq, limit=limit + 1)
    next_after = events[limit - 1]["seq"] if len(events) > limit else None
    events = events[:limit]
    if fmt == "json":
        return json_response({"events": events, "next_after": next_after})
    headers = {"Content-Disposition": f'attachment; filename="{run_id}-history.csv"'}
    if next_after is not None:
        headers[NEXT_AFTER] = str(next_after)
    return web.Response(text=history_csv(events), content_type="text/csv", headers=headers)


async def trace(request: web.Request) -> web.Response:
    return json_response(await _orch(request).trace(request.match_info["run_id"]))


def history_csv(events: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(HISTORY_CSV_COLUMNS)
    for e in events:
        data = orjson.dumps(e.get("data")).decode()
        writer.writerow((e["seq"], e["at"], e["type"], e.get("key") or "", data))
    return out.getvalue()


async def signal(request: web.Request) -> web.Response:
    body = schemas.parse_body(schemas.SendSignal, await request.read(), optional=True)
    run_id, name = request.match_info["run_id"], request.match_info["name"]
    await _orch(request).signal(run_id, name, body.data, by=caller_name(request))
    return json_response({"run_id": run_id, "signal": name, "delivered": True}, status=202)


async def cancel(request: web.Request) -> web.Response:
    body = schemas.parse_body(schemas.CancelRun, await request.read(), optional=True)
    run = await _orch(request).cancel(request.match_info["run_id"], reason=body.reason, by=caller_name(request))
    return json_response(run, status=202)


async def retry(request: web.Request) -> web.Response:
    return json_response(await _orch(request).retry(request.match_info["run_id"], by=caller_name(request)), status=202)


async def wait(request: web.Request) -> web.Response:
    timeout_s = schemas.query_wait_s(request.query)
    return json_response(await _orch(request).wait(request.match_info["run_id"], timeout_s))


# --- dead letters -----------------------------------------------------------------


async def list_dead_letters(request: web.Request) -> web.Response:
    q = request.query
    limit = schemas.query_int(q, "limit", schemas.DEFAULT_LIST_LIMIT, 1, schemas.MAX_LIST_LIMIT)
    items, next_cursor = await _orch(request).list_dead_letters(limit=limit, cursor=q.get("cursor") or None)
    return json_response({"dead_letters": items, "next_cursor": next_cursor})


async def replay_dead_letter(request: web.Request) -> web.Response:
    dead_letter_id = parse_id(request.match_info["id"], "id")
    return json_response(await _orch(request).replay_dead_letter(dead_letter_id), status=201)


# --- workflows and probes ---------------------------------------------------------


async def list_workflows(request: web.Request) -> web.Response:
    return json_response({"workflows": _orch(request).workflows()})


async def get_workflow(request: web.Request) -> web.Response:
    return json_response(_orch(request).workflow(request.match_info["name"]))


async def list_workflow_versions(request: web.Request) -> web.Response:
    return json_response(_orch(request).workflow_versions(request.match_info["name"]))


async def get_workflow_version(request: web.Request) -> web.Response:
    info = request.match_info
    return json_response(_orch(request).workflow_version(info["name"], info["version"]))


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})  # the process serves; readiness is /readyz


async def readyz(request: web.Request) -> web.Response:
    orch = _orch(request)
    health = orch.health()
    if orch.ready:
        return json_response({"status": "ready", **health})
    problems = ", ".join(f"{k} {v}" for k, v in health.items())
    return error_response(503, "not_ready", f"not ready: {problems}")


# Query parameters, for the OpenAPI document (the handlers parse them with schemas.query_*).
LIMIT = Param("limit", {"type": "integer", "minimum": 1, "maximum": schemas.MAX_LIST_LIMIT,
                        "default": schemas.DEFAULT_LIST_LIMIT}, "Page size")
CURSOR = Param("cursor", {"type": "string"}, "The `next_cursor` of the previous page; omit for the first")
MOMENT = {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "number"}]}
RUN_FILTERS = (
    Param("workflow", {"type": "string"}, "Only runs of this workflow"),
    Param("status", {"type": "string", "enum": list(schemas.RUN_STATUSES)}, "Only runs in this status"),
    Param("workflow_id", {"type": "string"}, "Only runs with this business key"),
    Param("since", MOMENT, "Created at or after: RFC 3339 (`2024-05-01T12:00:00Z`) or unix seconds"),
    Param("until", MOMENT, "Created before: RFC 3339 or unix seconds"),
    LIMIT, CURSOR,
)
HISTORY_PARAMS = (
    Param("after", {"type": "integer", "minimum": 0, "maximum": 2**62, "default": 0},
          "Events after this `seq`: the `next_after` of the previous page"),
    Param("limit", {"type": "integer", "minimum": 1, "maximum": schemas.MAX_HISTORY_LIMIT,
                    "default": schemas.DEFAULT_HISTORY_LIMIT}, "Page size"),
    Param("format", {"type": "string", "enum": ["json", "csv"]},
          "`csv` for the CSV export (so does `Accept: text/csv`); its next page is in the `X-Next-After` header"),
)
WAIT_PARAMS = (
    Param("timeout", {"type": "number", "minimum": 0, "default": schemas.DEFAULT_WAIT_S},
          f"Seconds to wait at most (capped at {schemas.MAX_WAIT_S:g}); the run as it is then if still open"),
)
DEAD_LETTER_ID = Param("id", {"type": "integer", "minimum": 0, "maximum": MAX_ID}, "The dead letter's id")
# path parameters: a Param named like a {placeholder} describes it
RUN_ID = Param("run_id", {"type": "string"}, "The run's id")
WORKFLOW = Param("name", {"type": "string"}, "The workflow's name")
SIGNAL = Param("name", {"type": "string"}, "The signal's name, as a `wait_for_signal` step names it")
VERSION = Param("version", {"type": "string"}, "The version, as the workflow file gives it")

ROUTES: list[Route] = [
    Route("POST", "/v1/workflows/{name}/runs", start_run, "operator", "Start a run", "runs", body=schemas.StartRun,
          responses={201: views.RunSummary, 200: views.RunSummary}, params=(WORKFLOW,)),
    Route("GET", "/v1/runs", list_runs, "viewer", "List runs, newest first", "runs",
          responses={200: views.RunPage}, params=RUN_FILTERS),
    Route("GET", "/v1/runs/{run_id}", get_run, "viewer", "Get a run with its steps", "runs",
          responses={200: views.RunDetail}, params=(RUN_ID,)),
    Route("GET", "/v1/runs/{run_id}/history", history, "viewer", "Get a run's history (JSON or CSV)", "runs",
          responses={200: (views.HistoryPage, "text/csv")}, params=(RUN_ID, *HISTORY_PARAMS)),
    Route("GET", "/v1/runs/{run_id}/trace", trace, "viewer",
          "Get a run's spans, rebuilt from its history (what tracing exports; open spans too)", "runs",
          responses={200: views.RunTraceView}, params=(RUN_ID,)),
    Route("POST", "/v1/runs/{run_id}/signals/{name}", signal, "operator", "Send a signal to a run", "runs",
          body=schemas.SendSignal, body_required=False, responses={202: views.SignalDelivered, 409: None},
          params=(RUN_ID, SIGNAL)),
    Route("POST", "/v1/runs/{run_id}/cancel", cancel, "operator", "Cancel a run", "runs", body=schemas.CancelRun,
          body_required=False, responses={202: views.RunSummary, 409: None}, params=(RUN_ID,)),
    Route("POST", "/v1/runs/{run_id}/retry", retry, "operator", "Retry a failed run from its failed step", "runs",
          responses={202: views.RunSummary, 409: None}, params=(RUN_ID,)),
    Route("GET", "/v1/runs/{run_id}/wait", wait, "viewer", "Wait (long poll) until a run finishes", "runs",
          responses={200: views.RunSummary}, params=(RUN_ID, *WAIT_PARAMS)),
    Route("GET", "/v1/workflows", list_workflows, "viewer", "List workflows (latest versions)", "workflows",
          responses={200: views.WorkflowList}),
    Route("GET", "/v1/workflows/{name}", get_workflow, "viewer", "Get a workflow", "workflows",
          responses={200: views.WorkflowView}, params=(WORKFLOW,)),
    Route("GET", "/v1/workflows/{name}/versions", list_workflow_versions, "viewer",
          "List a workflow's loaded versions, oldest first", "workflows", responses={200: views.WorkflowVersions},
          params=(WORKFLOW,)),
    Route("GET", "/v1/workflows/{name}/versions/{version}", get_workflow_version, "viewer",
          "Get one version's definition", "workflows", responses={200: views.WorkflowDefinition},
          params=(WORKFLOW, VERSION)),
    Route("GET", "/v1/dead-letters", list_dead_letters, "viewer", "List events that could not start a run",
          "dead letters", responses={200: views.DeadLetterPage}, params=(LIMIT, CURSOR)),
    Route("POST", "/v1/dead-letters/{id}/replay", replay_dead_letter, "operator",
          "Run a dead-lettered event through its trigger again", "dead letters",
          responses={201: views.Replayed, 400: None, 409: None, 422: None}, params=(DEAD_LETTER_ID,)),
    Route("GET", "/healthz", healthz, None, "Liveness: the process serves", "probes",
          responses={200: views.Health}),
    Route("GET", "/readyz", readyz, None, "Readiness: runtime, store and NATS", "probes",
          responses={200: views.Ready, 503: None}),
]

ROUTE_OF = web.AppKey("route_of", dict)


def all_routes() -> list[Route]:
    """Every endpoint of the API, from every module that serves some (each keeps its own
    `ROUTES` list of `server.api.table.Route`)."""
    # imported here: feature modules import this one
    from server.api import approvals, audit, export, hooks, metrics, openapi, schedules

    return [*ROUTES, *hooks.ROUTES, *openapi.ROUTES, *audit.ROUTES, *export.ROUTES, *approvals.ROUTES,
            *schedules.ROUTES, *metrics.ROUTES]


def add_routes(app: web.Application) -> None:
    route_of: dict[Any, Route] = {}
    for route in all_routes():
        route_of[app.router.add_route(route.method, route.path, route.handler)] = route
    app[ROUTE_OF] = route_of


def route_of(request: web.Request) -> Route | None:
    """The table entry of the route that matched, or None (the router's 404/405)."""
    return request.app[ROUTE_OF].get(request.match_info.route)


def role_of(request: web.Request) -> tuple[str | None, str] | None:
    route = route_of(request)
    return None if route is None else (route.role, f"{route.method} {route.path}")
