"""Errors over HTTP: one status table keyed by error class, applied by one middleware.

Every error response, ours or aiohttp's (unknown route, wrong method, body too
large), has the same JSON shape so clients parse one thing:

    {"error": {"code": "run_not_found", "message": "...", "field": "since"?}}

The middleware also stamps `X-Request-Id` on every response (the caller's, when
it sent a sane one) so a client report can be matched to the server log.
"""

from __future__ import annotations

import logging
import re
import itertools
import uuid
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from server.errors import (
    BadRequest,
    BatonError,
    Conflict,
    ExpressionError,
    Forbidden,
    Gone,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
    StoreError,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
)
from server.telemetry import logs

log = logging.getLogger("baton.api")

# Looked up along the exception's MRO, so WorkflowNotFound and RunNotFound inherit
# NotFound's 404. Anything not here (DefinitionError, ConfigError, ...) is a 500.
STATUS: dict[type[BatonError], int] = {
    NotFound: 404,
    InvalidInput: 422,
    ExpressionError: 422,
    Conflict: 409,
    BadRequest: 400,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    Unauthorized: 401,
    Forbidden: 403,
    Gone: 410,
    StoreError: 503,  # the disk or database; retrying later may work
    Unavailable: 503,  # starting up or shutting down
}

# aiohttp's own HTTP errors (raised by the router or by request.read()).
_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    503: "unavailable",
}

REQUEST_ID = "X-Request-Id"
# The id, for handlers that send their headers themselves (a streamed export is sent
# before this middleware sees it, so it stamps the header on its own)
REQUEST_ID_KEY = web.RequestKey("request_id", str)
# Echo only ids that cannot smuggle anything into logs or headers.
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Path parameters that are credentials (an approval link's token): never logged or
# written to the audit log.
SECRET_PARAMS = frozenset({"token", "signature", "secret"})
REDACTED = "[redacted]"


def loggable_path(request: web.Request) -> str:
    """The request's path with the values of SECRET_PARAMS replaced: safe for a log line."""
    path = request.path
    for name, value in request.match_info.items():
        if name in SECRET_PARAMS and value:
            path = path.replace(value, REDACTED)
    return path


def status_for(exc: BatonError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_response(status: int, code: str, message: str, field: str | None = None) -> web.Response:
    body: dict[str, str] = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    return web.Response(status=status, body=orjson.dumps({"error": body}), content_type="application/json")


# A random prefix per process and a counter: unique without a syscall per request.
_ID_PREFIX = uuid.uuid4().hex[:12]
_ID_COUNTER = itertools.count(1)


def _new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):08x}"


def middleware(max_body_bytes: int) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = request.headers.get(REQUEST_ID, "")
        if not _SAFE_REQUEST_ID.match(request_id):
            request_id = _new_request_id()
        request[REQUEST_ID_KEY] = request_id
        logs.bind(request_id=request_id)  # aiohttp runs each request in a task of its own: no reset needed
        try:
            # Refuse before reading a byte; client_max_size still guards chunked bodies.
            if request.content_length is not None and request.content_length > max_body_bytes:
                raise PayloadTooLarge(f"request body is {request.content_length} bytes; the limit is {max_body_bytes}")
            response = await handler(request)
        except BatonError as exc:
            status = status_for(exc)
            if status == 500:
                log.error("request %s %s failed [%s]: %s", request.method, loggable_path(request), request_id, exc)
            response = error_response(status, exc.code, exc.message, exc.field)
            if challenge := getattr(exc, "challenge", None):
                response.headers["WWW-Authenticate"] = challenge
        except web.HTTPException as exc:
            if exc.status < 400:  # a redirect or similar: not an error
                raise
            response = _from_http_exception(request, exc, max_body_bytes)
        except Exception:
            log.exception("request %s %s failed [%s]", request.method, loggable_path(request), request_id)
            response = error_response(500, "internal", f"internal server error (request id {request_id})")
        response.headers[REQUEST_ID] = request_id
        return response

    return errors


def _from_http_exception(request: web.Request, exc: web.HTTPException, max_body_bytes: int) -> web.Response:
    if exc.status == 413:
        message = f"request body is larger than the limit of {max_body_bytes} bytes"
    elif exc.status == 404:
        message = f"no route for {request.method} {request.path}"
    elif exc.status == 405:
        message = f"method {request.method} is not allowed on {request.path}"
    else:
        message = exc.reason
    response = error_response(exc.status, _HTTP_CODES.get(exc.status, f"http_{exc.status}"), message)
    if "Allow" in exc.headers:  # 405 tells the client what would have worked
        response.headers["Allow"] = exc.headers["Allow"]
    return response
