"""Batches of encoded spans, sent to the collector by one thread.

What the SDK's BatchSpanProcessor does, for spans that are bytes already
(server/telemetry/otlp.py): Baton's run, step and request spans are added as they
end, and a thread sends them, grouped by scope under the one resource, in batches of
`OTEL_BSP_MAX_EXPORT_BATCH_SIZE` spans, at the latest `OTEL_BSP_SCHEDULE_DELAY` ms
after they were added; beyond `OTEL_BSP_MAX_QUEUE_SIZE` waiting spans, new ones are
dropped and counted. Spans made through the OpenTelemetry SDK with the same provider
come in through `on_end` and are encoded with the SDK's own encoder.

The standard OTLP exporters send the batches (endpoint, headers, timeout, compression,
TLS and retries from OTEL_EXPORTER_OTLP_*): their subclasses in otlp_http.py and
otlp_grpc.py add `export_encoded(body, count)`, which hands them the bytes instead of
SDK spans.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor

from server.telemetry import otlp

log = logging.getLogger("baton.tracing")

# The SDK's defaults for the OTEL_BSP_* variables (OpenTelemetry SDK environment variables spec).
DEFAULT_SCHEDULE_DELAY_MS = 5000
DEFAULT_MAX_EXPORT_BATCH_SIZE = 512
DEFAULT_MAX_QUEUE_SIZE = 2048


def _positive_int(environ: Any, name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:  # as the SDK does: a bad value is reported and the default used
        log.warning("%s=%r is not a positive integer: using %d", name, raw, default)
        return default
    return value


class EncodedSpanProcessor(SpanProcessor):
    """The provider's span processor: `add` takes an encoded span, one thread sends batches."""

    def __init__(self, exporter: Any, resource: Resource, environ: Any = os.environ) -> None:
        if not callable(getattr(exporter, "export_encoded", None)):
            raise TypeError(f"{type(exporter).__name__} cannot send encoded spans (it has no export_encoded)")
        self.exporter = exporter
        self._resource = otlp.resource(resource.attributes)
        self._schema_url = resource.schema_url or ""
        self.delay_s = _positive_int(environ, "OTEL_BSP_SCHEDULE_DELAY", DEFAULT_SCHEDULE_DELAY_MS) / 1000
        self.max_queue = _positive_int(environ, "OTEL_BSP_MAX_QUEUE_SIZE", DEFAULT_MAX_QUEUE_SIZE)
        self.max_batch = min(_positive_int(environ, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", DEFAULT_MAX_EXPORT_BATCH_SIZE),
                             self.max_queue)
        # scope -> its spans, each framed as a field of ScopeSpans: bytes only, no tuple per span
        # (a tracked object that would live until its batch is sent)
        self._pending: dict[bytes, list[bytes]] = {}
        self._queued = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._added = self._done = 0  # spans queued, spans the thread has sent (or failed to)
        self._flush_to = 0  # force_flush: send at once everything up to this count
        self._closing = False
        self.dropped = self.exported = self.failed = 0
        self._thread = threading.Thread(target=self._work, name="baton-span-export", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- input

    def add(self, scope: bytes, span: bytes) -> None:
        """Queue one encoded span (otlp.span) of the scope (otlp.scope)."""
        framed = otlp.scope_span(span)
        with self._lock:
            if self._closing or self._queued >= self.max_queue:
                self._drop()
                return
            spans = self._pending.get(scope)
            if spans is None:
                spans = self._pending[scope] = []
            spans.append(framed)
            self._queued += 1
            self._added += 1
            if self._queued == self.max_batch:  # a full batch: no need to wait for the delay
                self._cond.notify()

    def on_end(self, span: ReadableSpan) -> None:
        """A span made with the SDK (provider.get_tracer): encoded as the SDK exporters would."""
        if not span.context.trace_flags.sampled:
            return
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        (scope_spans,) = encode_spans([span]).resource_spans[0].scope_spans
        self.add(scope_spans.scope.SerializeToString(), scope_spans.spans[0].SerializeToString())

    def _drop(self) -> None:
        if self.dropped == 0:
            log.warning("span queue full (%d spans, OTEL_BSP_MAX_QUEUE_SIZE) or closed: dropping spans", self.max_queue)
        self.dropped += 1

    # ---------------------------------------------------------------- output

    def _work(self) -> None:
        while True:
            with self._lock:
                if not self._closing and self._flush_to <= self._done and self._queued < self.max_batch:
                    self._cond.wait(self.delay_s)
                batch, count = self._take()
                closing = self._closing
            if batch:
                self._send(batch, count)
                with self._lock:
                    self._done += count
                    self._cond.notify_all()
            elif closing:
                return

    def _take(self) -> tuple[list[tuple[bytes, list[bytes]]], int]:
        """Up to a batch of the queued spans, by scope (the lock held)."""
        batch, count = [], 0
        for scope, spans in list(self._pending.items()):
            taken = spans[:self.max_batch - count]
            if len(taken) == len(spans):
                del self._pending[scope]
            else:
                del spans[:len(taken)]
            batch.append((scope, taken))
            count += len(taken)
            if count == self.max_batch:
                break
        self._queued -= count
        return batch, count

    def _send(self, batch: list[tuple[bytes, list[bytes]]], count: int) -> None:
        body = otlp.export_request(self._resource, batch, self._schema_url)
        try:
            sent = self.exporter.export_encoded(body, count)
        except Exception:  # the exporter logs its own failures; anything else must not end the thread
            log.exception("a batch of %d spans could not be exported", count)
            sent = False
        if sent:
            self.exported += count
        else:
            self.failed += count

    # -------------------------------------------------------------- lifetime

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        with self._lock:
            target = self._added
            self._flush_to = max(self._flush_to, target)
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._done >= target or not self._thread.is_alive(),
                                       timeout_millis / 1000)

    def shutdown(self) -> None:
        """Send what is queued, then close the exporter. A second call returns at once
        (the provider's exit hook, while a first one still waits for a collector)."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._cond.notify_all()
        self._thread.join()
        self.exporter.shutdown()
