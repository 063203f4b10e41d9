"""A span per API request (OpenTelemetry HTTP semantic conventions, server side).

Why not opentelemetry-instrumentation-aiohttp-server: its middleware only works after
its instrumentor has patched `aiohttp.web.Application` for the whole process (module
globals it reads are set there), which would trace every aiohttp app in the
process, tests' helper servers included. This is the part we need: the caller's W3C
context in, one SERVER span named after the route, its status out.

Why not an SDK span either: making and ending one, then encoding it, cost more than
the rest of a traced run. The span is decided as the SDK's tracer would decide it
(the provider's sampler and id generator, the caller's context as parent, its trace
state kept), the handler runs under a context holding its ids (what `caller_trace`
and any OpenTelemetry API call in the handler see), and at the end the span is
encoded (otlp.py) and queued with the run spans. Nothing in a handler can add
attributes to it: nothing does.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, get_current_span, set_span_in_context

from server.api.errors import loggable_path
from server.telemetry import otlp
from server.telemetry.logs import redact
from server.telemetry.tracing import parent_decision

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


# W3C Trace Context level 2's "random trace id" flag, where the API has it (it sets it
# when the id generator's trace ids are random, as the SDK's tracer does)
_RANDOM_FLAG = getattr(TraceFlags, "RANDOM_TRACE_ID", 0)


def tracing_middleware(provider: Any, version: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """`provider`: a BatonTracerProvider (server/telemetry/tracing.py): its sampler, id
    generator and the processor the encoded spans go to."""
    excluded = excluded_routes()
    sampler, ids, processor = provider.sampler, provider.id_generator, provider.processor
    decide = parent_decision(sampler)
    scope = otlp.scope("baton.api", version)
    root_flags = _RANDOM_FLAG if getattr(ids, "is_trace_id_random", lambda: False)() else 0

    @web.middleware
    async def trace_request(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else None
        if route in excluded:
            return await handler(request)
        name = f"{request.method} {route}" if route else request.method
        # the path with its credentials masked: an approval link's last segment is one
        attributes: dict[str, Any] = {"http.request.method": request.method, "url.path": loggable_path(request),
                                      "url.scheme": request.scheme}
        if route:
            attributes["http.route"] = route
        carrier = propagate.extract(request.headers)
        parent = get_current_span(carrier).get_span_context()
        if parent.is_valid:
            trace_id, flags = parent.trace_id, int(parent.trace_flags) & _RANDOM_FLAG
        else:
            parent, trace_id, flags = None, ids.generate_trace_id(), root_flags
        if decide is not None:  # a standard sampler: it would keep the parent's trace state
            sampled = decide(parent.trace_flags.sampled if parent is not None else None)
            trace_state, extra = (parent.trace_state if parent is not None else None), None
        else:
            decision = sampler.should_sample(carrier, trace_id, name, SpanKind.SERVER, attributes)
            sampled = decision.decision.is_sampled()
            trace_state, extra = decision.trace_state, decision.attributes
        context = SpanContext(trace_id, ids.generate_span_id(), is_remote=False,
                              trace_flags=TraceFlags(flags | (TraceFlags.SAMPLED if sampled else 0)),
                              trace_state=trace_state)
        token = otel_context.attach(set_span_in_context(NonRecordingSpan(context), carrier))
        start_ns = time.time_ns()
        status, failure = 500, None
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        except BaseException as exc:  # a 500 (or a cancelled request): say what ended it
            failure = redact(f"{type(exc).__name__}: {exc}")
            raise
        finally:
            otel_context.detach(token)
            if sampled:
                if extra:
                    attributes.update(extra)
                attributes["http.response.status_code"] = status
                # a 4xx is the caller's error, not the server's (HTTP semantic conventions)
                code = otlp.STATUS_ERROR if status >= 500 else otlp.STATUS_UNSET
                processor.add(scope, otlp.span(
                    trace_id.to_bytes(16, "big"), context.span_id.to_bytes(8, "big"),
                    parent.span_id.to_bytes(8, "big") if parent is not None else None, name, otlp.KIND_SERVER,
                    start_ns, time.time_ns(), attributes, (), code, failure if code else None,
                    otlp.FLAG_HAS_IS_REMOTE | (otlp.FLAG_IS_REMOTE if parent is not None and parent.is_remote else 0),
                    trace_state.to_header() if trace_state else ""))

    return trace_request
