"""`GET /v1/export/runs` and `GET /v1/export/steps`: CSV or JSON Lines, streamed.

For audits and chargeback: one row per run, or one row per step attempt (the
columns: server/runtime/export.py). The body is written page by page as the store
yields pages (chunked transfer), so neither the server nor a client that reads it
as a stream holds the whole export, whatever its size.

The first page is read before the response starts: a bad filter or a failing store
still gets an ordinary error response. A failure after that cannot change the status
any more; the connection is then cut without the final chunk, so the client sees a
truncated transfer, never a short file that looks complete.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import orjson
from aiohttp import web

from server.api import schemas
from server.api.app import SETTINGS
from server.api.errors import REQUEST_ID, REQUEST_ID_KEY
from server.api.routes import MOMENT, ORCH
from server.api.table import Param, Route
from server.errors import BadRequest
from server.runtime.export import RUN_COLUMNS, STEP_COLUMNS

log = logging.getLogger("baton.api")

CSV = "text/csv"
JSONL = "application/x-ndjson"
FORMATS = {"csv": CSV, "jsonl": JSONL}
# Accept values that ask for JSON Lines (there is no registered type; these are the common ones)
_JSONL_TYPES = (JSONL, "application/jsonl", "application/jsonlines", "application/x-jsonlines")


async def export_runs(request: web.Request) -> web.StreamResponse:
    fmt, filters = _query(request)
    return await _stream(request, "runs", fmt, RUN_COLUMNS, request.app[ORCH].export_runs(**filters))


async def export_steps(request: web.Request) -> web.StreamResponse:
    fmt, filters = _query(request)
    return await _stream(request, "steps", fmt, STEP_COLUMNS, request.app[ORCH].export_steps(**filters))


def _query(request: web.Request) -> tuple[str, dict[str, Any]]:
    q = request.query
    fmt = q.get("format")
    if not fmt:
        accept = request.headers.get("Accept", "").lower()
        fmt = "jsonl" if any(t in accept for t in _JSONL_TYPES) else "csv"
    if fmt not in FORMATS:
        raise BadRequest(f"format must be csv or jsonl, got {fmt!r}", field="format")
    filters = dict(
        workflow=q.get("workflow") or None,
        status=schemas.query_status(q),
        since=schemas.query_timestamp(q, "since"),
        until=schemas.query_timestamp(q, "until"),
        page_size=request.app[SETTINGS].audit.export_page_size,
    )
    return fmt, filters


async def _stream(request: web.Request, name: str, fmt: str, columns: tuple[str, ...],
                  pages: AsyncIterator[list[dict[str, Any]]]) -> web.StreamResponse:
    encode = _csv_encoder(columns) if fmt == "csv" else _jsonl
    async with aclosing(pages):
        first = await anext(pages, [])  # an error here is still an ordinary error response
        response = web.StreamResponse(headers={
            "Content-Type": f"{FORMATS[fmt]}; charset=utf-8",
            "Content-Disposition": f'attachment; filename="{name}.{fmt}"',
            REQUEST_ID: request[REQUEST_ID_KEY],  # sent now: the error middleware sees it too late
        })
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            head = _csv_header(columns) if fmt == "csv" else b""
            await response.write(head + encode(first))
            async for page in pages:
                await response.write(encode(page))
            await response.write_eof()
        except ConnectionError:
            pass  # the client went away; nothing to tell it
        except Exception:
            log.exception("export of %s failed after it started [%s]; cutting the connection", name,
                          request[REQUEST_ID_KEY])
            if request.transport is not None:
                request.transport.close()  # no final chunk: the client sees the transfer cut short
    return response


def _csv_header(columns: tuple[str, ...]) -> bytes:
    out = io.StringIO()
    csv.writer(out).writerow(columns)
    return out.getvalue().encode()


def _csv_encoder(columns: tuple[str, ...]) -> Callable[[list[dict[str, Any]]], bytes]:
    def encode(rows: list[dict[str, Any]]) -> bytes:
        out = io.StringIO()
        csv.writer(out).writerows([row[c] for c in columns] for row in rows)  # None -> empty cell
        return out.getvalue().encode()

    return encode


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(row) + b"\n" for row in rows)


EXPORT_PARAMS = (
    Param("format", {"type": "string", "enum": list(FORMATS), "default": "csv"},
          "`csv` (RFC 4180, a header row) or `jsonl` (one JSON object a line); without it, "
          f"`Accept: {JSONL}` chooses jsonl"),
    Param("since", MOMENT, "Runs created at or after: RFC 3339 (`2026-01-01` or `2026-01-01T00:00:00Z`) "
                            "or unix seconds"),
    Param("until", MOMENT, "Runs created before: RFC 3339 or unix seconds"),
    Param("workflow", {"type": "string"}, "Only runs of this workflow"),
    Param("status", {"type": "string", "enum": list(schemas.RUN_STATUSES)}, "Only runs in this status"),
)

ROUTES: list[Route] = [
    Route("GET", "/v1/export/runs", export_runs, "viewer",
          "Export runs as CSV or JSON Lines, oldest first (streamed)", "export",
          responses={200: (CSV, JSONL)}, params=EXPORT_PARAMS),
    Route("GET", "/v1/export/steps", export_steps, "viewer",
          "Export step attempts (one row per attempt) as CSV or JSON Lines (streamed)", "export",
          responses={200: (CSV, JSONL)}, params=EXPORT_PARAMS),
]
