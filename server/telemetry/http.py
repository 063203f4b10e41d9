"""A span per API request (OpenTelemetry HTTP semantic conventions, server side).

Why not opentelemetry-instrumentation-aiohttp-server: its middleware only works after
its instrumentor has patched `aiohttp.web.Application` for the whole process (module
globals it reads are set there), which would trace every aiohttp app in the
process, tests' helper servers included. This is the part we need: the caller's W3C
context in, one SERVER span named after the route, its status out.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from opentelemetry import propagate
from opentelemetry.trace import SpanKind, Status, StatusCode, TracerProvider

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def tracing_middleware(provider: TracerProvider, version: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    tracer = provider.get_tracer("baton.api", version)

    @web.middleware
    async def trace_request(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else None
        name = f"{request.method} {route}" if route else request.method
        attributes = {"http.request.method": request.method, "url.path": request.path, "url.scheme": request.scheme}
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
