"""The HTTP API as an aiohttp application, wired in one place."""

from __future__ import annotations

from aiohttp import web

from server.api import audit, auth, errors, routes
from server.runtime.base import Orchestrator
from server.settings import Settings

SETTINGS = web.AppKey("settings", Settings)


def build_api(orch: Orchestrator, settings: Settings) -> web.Application:
    max_body_bytes = settings.limits.max_body_bytes
    # client_max_size bounds bodies without a Content-Length (chunked); the
    # middleware refuses a declared oversize body before it is read.
    # audit outermost: it records the final status of every mutating call, refusals included;
    # then errors: every failure, auth's included, gets the one JSON shape
    middlewares = [
        audit.middleware(settings.audit.trusted_proxies),
        errors.middleware(max_body_bytes),
        auth.middleware(settings.auth, routes.role_of),
    ]
    provider = getattr(orch, "tracer_provider", None)
    if provider is not None:  # outermost: the request's span covers everything, refusals included
        from server.telemetry.http import tracing_middleware

        middlewares.insert(0, tracing_middleware(provider, "0"))
    app = web.Application(client_max_size=max_body_bytes, middlewares=middlewares)
    app[routes.ORCH] = orch
    app[SETTINGS] = settings
    routes.add_routes(app)
    return app
