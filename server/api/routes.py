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

from server.api import schemas
from server.api.auth import caller_name
from server.api.table import Route
from server.api.errors import error_response
from server.errors import BadRequest
from server.runtime.base import Orchestrator

ORCH = web.AppKey("orch", Orchestrator)
HISTORY_CSV_COLUMNS = ("seq", "at", "type", "key", "data")


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


def _orch(request: web.Request) -> Orchestrator:
    return request.app[ORCH]


# --- runs -------------------------------------------------------------------------


async def start_run(request: web.Request) -> web.Response:
    body = schemas.parse_body(schemas.StartRun, await request.read())
    run, created = await _orch(request).start_run(
        request.match_info["name"], body.input, workflow_id=body.workflow_id, version=body.version,
        by=caller_name(request),
    )
    return json_response(run, status=201 if created else 200)


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
    events = await _orch(request).history(run_id, after_seq=after_seq, limit=limit)
    if fmt == "json":
        return json_response({"events": events})
    return web.Response(
        text=history_csv(events),
        content_type="text/csv",
        headers={"Content-Disposition": f'attachment; filename="{run_id}-history.csv"'},
    )


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
    raw = request.match_info["id"]
    if not raw.isdigit():
        raise BadRequest(f"dead letter ids are numbers, not {raw!r}", field="id")
    return json_response(await _orch(request).replay_dead_letter(int(raw)), status=201)


# --- workflows and probes ---------------------------------------------------------


async def list_workflows(request: web.Request) -> web.Response:
    return json_response({"workflows": _orch(request).workflows()})


async def get_workflow(request: web.Request) -> web.Response:
    return json_response(_orch(request).workflow(request.match_info["name"]))


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})  # the process serves; readiness is /readyz


async def readyz(request: web.Request) -> web.Response:
    orch = _orch(request)
    health = orch.health()
    if orch.ready:
        return json_response({"status": "ready", **health})
    problems = ", ".join(f"{k} {v}" for k, v in health.items())
    return error_response(503, "not_ready", f"not ready: {problems}")


ROUTES: list[Route] = [
    Route("POST", "/v1/workflows/{name}/runs", start_run, "operator", "Start a run", "runs", body=schemas.StartRun),
    Route("GET", "/v1/runs", list_runs, "viewer", "List runs, newest first", "runs"),
    Route("GET", "/v1/runs/{run_id}", get_run, "viewer", "Get a run with its steps", "runs"),
    Route("GET", "/v1/runs/{run_id}/history", history, "viewer", "Get a run's history (JSON or CSV)", "runs"),
    Route("POST", "/v1/runs/{run_id}/signals/{name}", signal, "operator", "Send a signal to a run", "runs",
          body=schemas.SendSignal),
    Route("POST", "/v1/runs/{run_id}/cancel", cancel, "operator", "Cancel a run", "runs", body=schemas.CancelRun),
    Route("POST", "/v1/runs/{run_id}/retry", retry, "operator", "Retry a failed run from its failed step", "runs"),
    Route("GET", "/v1/runs/{run_id}/wait", wait, "viewer", "Wait (long poll) until a run finishes", "runs"),
    Route("GET", "/v1/workflows", list_workflows, "viewer", "List workflows (latest versions)", "workflows"),
    Route("GET", "/v1/workflows/{name}", get_workflow, "viewer", "Get a workflow", "workflows"),
    Route("GET", "/v1/dead-letters", list_dead_letters, "viewer", "List events that could not start a run",
          "dead letters"),
    Route("POST", "/v1/dead-letters/{id}/replay", replay_dead_letter, "operator",
          "Run a dead-lettered event through its trigger again", "dead letters"),
    Route("GET", "/healthz", healthz, None, "Liveness: the process serves", "probes"),
    Route("GET", "/readyz", readyz, None, "Readiness: runtime, store and NATS", "probes"),
]

ROUTE_OF = web.AppKey("route_of", dict)


def all_routes() -> list[Route]:
    """Every endpoint of the API, from every module that serves some (each keeps its own
    `ROUTES` list of `server.api.table.Route`)."""
    return list(ROUTES)


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
    return None if route is None else (route.role, route.summary[0].lower() + route.summary[1:])
