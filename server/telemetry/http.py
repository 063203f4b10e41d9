"""A span per API request (OpenTelemetry HTTP semantic conventions, server side).

Why not opentelemetry-instrumentation-aiohttp-server: its middleware only works after
its instrumentor has patched `aiohttp.web.Application` for the whole process (module
globals it reads are set there), which would trace every aiohttp app in the
process, tests' helper servers included. This is the part we need: the caller's W3C
context in, one SERVER span named after the route, its status out.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from opentelemetry import propagate
from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider

from server.api.errors import loggable_path

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Routes with no span by default: probes and scrapes (many, and nothing to see), and the
# /wait long-poll (its time is the run's, which the run span already shows). The
# instrumentations' variable, OTEL_PYTHON_EXCLUDED_URLS (comma-separated route
# templates here), replaces the list; set it empty to trace every request.
DEFAULT_EXCLUDED = ("/healthz", "/readyz", "/metrics", "/v1/runs/{run_id}/wait")


def excluded_routes(environ: Any = os.environ) -> frozenset[str]:
    value = environ.get("OTEL_PYTHON_AIOHTTP_SERVER_EXCLUDED_URLS", environ.get("OTEL_PYTHON_EXCLUDED_URLS"))
    if value is None:
        return frozenset(DEFAULT_EXCLUDED)
    return frozenset(part.strip() for part in value.split(",") if part.strip())


def tracing_middleware(provider: TracerProvider, version: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    tracer = provider.get_tracer("baton.api", version)
    excluded = excluded_routes()

    @web.middleware
    async def trace_request(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else None
        if route in excluded:
            return await handler(request)
        name = f"{request.method} {route}" if route else request.method
        # the path with its credentials masked: an approval link's last segment is one
        attributes = {"http.request.method": request.method, "url.path": loggable_path(request),
                      "url.scheme": request.scheme}
        if route:
            attributes["http.route"] = route
        with tracer.start_as_current_span(name, context=propagate.extract(request.headers), kind=SpanKind.SERVER,
                                          attributes=attributes, record_exception=False) as span:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                response = exc
                raise
            finally:
                status = getattr(locals().get("response"), "status", 500)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:  # a 4xx is the caller's error, not the server's (semantic conventions)
                    span.set_status(Status(StatusCode.ERROR))
            return response

    return trace_request
