"""The step attempt's span as the current OpenTelemetry context inside its handler.

A handler that makes spans of its own (with the OpenTelemetry API, or through an
instrumented library) makes them children of the attempt's span, in the run's
trace, whether it runs in the server or in `baton worker`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import context as otel_context
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

from server.telemetry.ids import parse_traceparent


@contextmanager
def handler_span(traceparent: str | None) -> Iterator[None]:
    parsed = parse_traceparent(traceparent)
    if parsed is None:
        yield
        return
    trace_id, span_id = parsed
    span = NonRecordingSpan(SpanContext(int(trace_id, 16), int(span_id, 16), is_remote=True,
                                        trace_flags=TraceFlags(TraceFlags.SAMPLED)))
    token = otel_context.attach(set_span_in_context(span))
    try:
        yield
    finally:
        otel_context.detach(token)
