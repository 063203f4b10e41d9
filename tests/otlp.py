"""A real OTLP/HTTP trace receiver on loopback, for tests: what Jaeger's port 4318 does.

It runs an aiohttp server in a thread of its own (so a test may be sync, driving a
server subprocess, or async), decodes each `ExportTraceServiceRequest` with
opentelemetry-proto, and keeps the spans as plain dicts.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse

from tests.inproc import eventually
from tests.loopback import ThreadedApp

KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
STATUS = {0: "unset", 1: "ok", 2: "error"}


def _value(v: Any) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, which) if which else None


def _span(resource: dict[str, Any], s: Any) -> dict[str, Any]:
    return {
        "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(), "parent_id": s.parent_span_id.hex() or None,
        "name": s.name, "kind": KINDS.get(s.kind, str(s.kind)),
        "start": s.start_time_unix_nano / 1e9, "end": s.end_time_unix_nano / 1e9,
        "attributes": {a.key: _value(a.value) for a in s.attributes},
        "events": [{"name": e.name, "at": e.time_unix_nano / 1e9, "attributes": {a.key: _value(a.value) for a in e.attributes}}
                   for e in s.events],
        "status": STATUS.get(s.status.code, str(s.status.code)), "message": s.status.message,
        "resource": resource,
    }


class OtlpReceiver(ThreadedApp):
    def __init__(self) -> None:
        super().__init__()
        self.spans: list[dict[str, Any]] = []
        self.requests = 0
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        """For OTEL_EXPORTER_OTLP_ENDPOINT: the exporter appends /v1/traces."""
        return self.url

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/traces", self._traces)

    async def _traces(self, request: web.Request) -> web.Response:
        body = ExportTraceServiceRequest()
        body.ParseFromString(await request.read())
        got = []
        for rs in body.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                got += [_span(resource, s) for s in ss.spans]
        with self._lock:
            self.spans += got
            self.requests += 1
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf")

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.spans)

    def run_spans(self, run_id: str) -> list[dict[str, Any]]:
        return [s for s in self.snapshot() if s["attributes"].get("baton.run.id") == run_id]

    def wait_for(self, predicate, what: str, timeout_s: float = 15.0) -> list[dict[str, Any]]:
        """Block until predicate(spans) is truthy; bounded."""
        deadline = time.monotonic() + timeout_s
        while True:
            spans = self.snapshot()
            if predicate(spans):
                return spans
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; spans: {[s['name'] for s in spans]}")
            time.sleep(0.02)

    async def await_for(self, predicate, what: str, timeout_s: float = 15.0) -> list[dict[str, Any]]:
        """`wait_for` for async tests: the event loop keeps running while it waits."""
        async def check() -> list[dict[str, Any]] | None:
            spans = self.snapshot()
            return spans if predicate(spans) else None
        return await eventually(check, what, timeout_s)
