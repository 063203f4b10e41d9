"""The audit log over HTTP: the middleware that records every mutating call, and `GET /v1/audit`.

What the middleware records, for every request that matched a route and whose method
is not GET, HEAD or OPTIONS (reads are not audited: they change nothing):

    at          when the answer was known
    actor       the token's name (`anonymous` with auth off, `hook:<path>` for a webhook
                whose signature verified), else `unauthenticated`: refused calls (401)
                are recorded too, they are what an auditor looks for
    action      the operation: the route's operationId (start_run, cancel, ...)
    target      the path's first parameter, named by the path segment before it:
                `workflow:<name>`, `run:<id>`, `hook:<path>`, `dead-letter:<id>`
    remote      the caller's address: the TCP peer, or X-Forwarded-For only as far as
                `audit.trusted_proxies` says proxies can be trusted
    status      the HTTP status answered
    request_id  the X-Request-Id of the response
    detail      method, path, the other path parameters, the run(s) the call created or
                acted on (from the response), the error code and message if it failed, and
                what the handler added with `note(request, ...)` (an approval's id, say)

Never recorded: bodies and query strings (inputs, signal data and links may carry
secrets), and path parameters that are credentials (errors.SECRET_PARAMS).

Order (server/api/app.py): this middleware is the outermost, so it sees the final
status of every response, auth's refusals and the error middleware's included.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from pydantic import BaseModel, Field

from server.api import schemas
from server.api.auth import caller_name
from server.api.errors import REDACTED, REQUEST_ID, REQUEST_ID_KEY, SECRET_PARAMS, loggable_path
from server.api.routes import CURSOR, LIMIT, MOMENT, ORCH, json_response, route_of
from server.api.table import Param, Route
from server.api.views import Timestamp

log = logging.getLogger("baton.audit")

READS = frozenset({"GET", "HEAD", "OPTIONS"})
UNAUTHENTICATED = "unauthenticated"
# Error messages are for people; a long one is cut so one entry stays small.
MAX_MESSAGE_CHARS = 500
# Responses read for the run ids they name; anything bigger is not a small JSON view.
MAX_PARSED_BODY_BYTES = 65_536
# aiohttp's `{name}` or `{name:regex}` (a regex may hold `/`, and braces only in pairs)
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::(?:[^{}]|\{[^{}]*\})*)?\}")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
NOTES = web.RequestKey("audit_notes", dict)


def note(request: web.Request, **detail: Any) -> None:
    """Add to this request's audit entry what only its handler knows (the approval a link
    decided, ...): small JSON values, never a secret."""
    request.setdefault(NOTES, {}).update(detail)


def middleware(trusted_proxies: int = 0) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    # entries written while their request was cancelled: kept referenced until done
    pending: set[asyncio.Task] = set()

    @web.middleware
    async def audit(request: web.Request, handler: Handler) -> web.StreamResponse:
        route = route_of(request)
        if route is None or request.method in READS:
            return await handler(request)  # the router's 404/405, or a read
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # a redirect, which the error middleware lets through
            await _record(request, route, exc, trusted_proxies)
            raise
        except BaseException:
            # cancelled (the server stopping) or a bug below: the call may have acted, so it
            # is recorded without an outcome; a cancelled task cannot await the commit itself
            task = asyncio.ensure_future(_record(request, route, None, trusted_proxies))
            pending.add(task)
            task.add_done_callback(pending.discard)
            raise
        # Awaited before the response goes out: a call the client saw acknowledged is
        # in the audit log (the entry rides the store's group commit, so this costs one
        # commit wait, shared with every other writer of the moment).
        await _record(request, route, response, trusted_proxies)
        return response

    return audit


async def _record(request: web.Request, route: Route, response: web.StreamResponse | None,
                  trusted_proxies: int) -> None:
    params = dict(request.match_info)
    target, named = _target(route.path, params)
    detail: dict[str, Any] = {"method": request.method, "path": loggable_path(request), **named}
    peer = request.remote
    remote = client_address(request, trusted_proxies)
    if remote != peer:
        detail["peer"] = peer
    status = None if response is None else response.status
    if response is None:
        detail["outcome"] = "interrupted"
    else:
        detail.update(_outcome(response, target))
    detail.update(request.get(NOTES, {}))
    request_id = request.get(REQUEST_ID_KEY) or (response.headers.get(REQUEST_ID) if response is not None else None)
    try:
        await request.app[ORCH].audit(
            caller_name(request) or UNAUTHENTICATED, route.operation_id, target=target, remote=remote,
            status=status, request_id=request_id, detail=detail,
        )
    except Exception:
        # The call has acted already (its transition is committed): answering with an
        # error now would invite a retry that acts twice. So the client gets its answer
        # and the operator gets this line, with everything the entry would have held.
        log.exception("audit entry not written: %s %s by %s -> %s [%s]", request.method, loggable_path(request),
                      caller_name(request) or UNAUTHENTICATED, status, request_id)


def _target(path: str, params: dict[str, str]) -> tuple[str | None, dict[str, str]]:
    """(`<what>:<value>` of the first path parameter, {what: value} of the others), where
    `what` is the path segment before the parameter, singular (`/runs/{run_id}` -> run)."""
    target, named, end = None, {}, 0
    for match in _PLACEHOLDER.finditer(path):
        literal, end = path[end : match.start()], match.end()
        name = match.group(1)
        if name not in params:
            continue
        before = literal.strip("/").rpartition("/")[2] or name
        what = before[:-1] if before.endswith("s") and not before.endswith("ss") else before
        value = REDACTED if name in SECRET_PARAMS else params[name]
        if target is None:
            target = f"{what}:{value}"
        else:
            named[what] = value
    return target, named


def _outcome(response: web.StreamResponse, target: str | None) -> dict[str, Any]:
    """The error of a failed call; the runs a successful one created or acted on."""
    body = _json_body(response)
    if response.status >= 400:
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, dict):
            return {}
        return {"error": error.get("code"), "message": str(error.get("message", ""))[:MAX_MESSAGE_CHARS]}
    if not isinstance(body, dict):
        return {}
    run = body.get("run") if isinstance(body.get("run"), dict) else body  # a run view, bare or under "run"
    if isinstance(run.get("run_id"), str):
        return {} if target == f"run:{run['run_id']}" else {"run_id": run["run_id"]}
    runs = body.get("runs")
    if isinstance(runs, list):
        ids = [r["run_id"] for r in runs if isinstance(r, dict) and isinstance(r.get("run_id"), str)]
        return {"runs": ids} if ids else {}
    return {}


def _json_body(response: web.StreamResponse) -> Any:
    if not isinstance(response, web.Response) or response.content_type != "application/json":
        return None
    body = response.body
    if not isinstance(body, (bytes, bytearray)) or len(body) > MAX_PARSED_BODY_BYTES:
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def client_address(request: web.Request, trusted_proxies: int) -> str | None:
    """The TCP peer; behind `trusted_proxies` proxies, the address the outermost one saw.

    Each proxy appends the address it received the request from to X-Forwarded-For, so
    only the last `trusted_proxies` entries were written by proxies we trust; anything
    left of them came from the client and may be made up."""
    if trusted_proxies <= 0:
        return request.remote
    hops = [h.strip() for value in request.headers.getall("X-Forwarded-For", []) for h in value.split(",")]
    hops = [h for h in hops if h]
    if len(hops) < trusted_proxies:
        return request.remote  # it did not come through every proxy: only the peer is known
    return hops[-trusted_proxies]


# --- GET /v1/audit ----------------------------------------------------------------


class AuditEntry(BaseModel):
    id: int = Field(description="Increases with every entry; never reused")
    at: Timestamp
    actor: str = Field(description="A token's name, `anonymous` (auth off), `unauthenticated` (refused), "
                                   "`hook:<path>`, or `system` (Baton itself)")
    action: str = Field(description="The API operation (`start_run`, `cancel`, ...) or e.g. `definition.loaded`")
    target: str | None = Field(description="What it acted on: `run:<id>`, `workflow:<name>`, `hook:<path>`, ...")
    remote: str | None = Field(description="The caller's address")
    status: int | None = Field(description="The HTTP status answered; null for actions outside a request")
    request_id: str | None = Field(description="The response's X-Request-Id, to find the call in the server log")
    detail: dict[str, Any] = Field(description="method, path, other path parameters, `run_id`/`runs` created "
                                               "or acted on, `error` code and `message` of a failed call")


class AuditPage(BaseModel):
    entries: list[AuditEntry] = Field(description="Newest first")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next (older) page; null on the last")


async def list_audit(request: web.Request) -> web.Response:
    q = request.query
    entries, next_cursor = await request.app[ORCH].list_audit(
        limit=schemas.query_int(q, "limit", schemas.DEFAULT_LIST_LIMIT, 1, schemas.MAX_LIST_LIMIT),
        cursor=q.get("cursor") or None,
        since=schemas.query_timestamp(q, "since"),
        until=schemas.query_timestamp(q, "until"),
        actor=q.get("actor") or None,
        action=q.get("action") or None,
    )
    return json_response({"entries": entries, "next_cursor": next_cursor})



ROUTES: list[Route] = [
    Route("GET", "/v1/audit", list_audit, "admin", "List the audit log, newest first", "audit",
          responses={200: AuditPage},
          params=(
              Param("since", MOMENT, "Entries at or after: RFC 3339 (`2026-01-01T00:00:00Z`) or unix seconds"),
              Param("until", MOMENT, "Entries before: RFC 3339 or unix seconds"),
              Param("actor", {"type": "string"}, "Only this actor (a token name, `unauthenticated`, `system`, ...)"),
              Param("action", {"type": "string"}, "Only this action (`start_run`, `definition.loaded`, ...)"),
              LIMIT, CURSOR,
          )),
]
