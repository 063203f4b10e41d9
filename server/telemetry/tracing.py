"""OpenTelemetry tracing: the provider, the OTLP exporter, and the spans of runs.

Set-up follows the standard `OTEL_*` environment variables: the exporter's
endpoint, headers and protocol (`OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`: http/protobuf,
the default, or grpc), the sampler (`OTEL_TRACES_SAMPLER[_ARG]`), the service name
and resource attributes. `OTEL_SDK_DISABLED=true` or `tracing.enabled: false`
switch tracing off; by default it is on when an OTLP endpoint is configured.

Run spans are not made with a tracer: the pump hands each commit's history rows to
`RunSpans.committed` (cheap: a queue put), and a background task turns them into
spans with server/telemetry/trace.py and hands the finished ones to the batch
span processor, with the ids and times the records give. So a span survives a
restart (it is rebuilt from history), and a wait of three days is one span of
three days, exported when it ends. API requests are traced by the aiohttp
instrumentation, through the same provider.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import orjson
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event as SpanEvent
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace import set_span_in_context

from server.engine.graph import CompiledWorkflow
from server.store.base import HistoryRow, Store
from server.telemetry.logs import redact, redact_value
from server.telemetry.trace import ERROR, OK, RunTrace, SpanRecord

log = logging.getLogger("baton.tracing")

# Runs whose open spans are kept in memory between commits; a run beyond this is
# rebuilt from its history when its next rows come (one read).
MAX_OPEN_RUNS = 10_000
# Commits waiting for the span task; beyond this, spans are dropped (and counted) rather than hold up the pump.
MAX_QUEUED = 100_000
HISTORY_PAGE = 1000
# At shutdown, how long the last spans may take to reach the collector.
FLUSH_TIMEOUT_S = 5.0
_KINDS = {"internal": SpanKind.INTERNAL, "producer": SpanKind.PRODUCER, "consumer": SpanKind.CONSUMER}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("baton-orchestrator")
    except Exception:  # not installed as a package (a source checkout on sys.path)
        return "0"


def tracing_enabled(setting: bool | None, environ: Any = os.environ) -> bool:
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    if setting is not None:
        return setting
    return bool(environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def make_exporter(environ: Any = os.environ) -> SpanExporter:
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip().lower()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    if protocol != "http/protobuf":
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: use http/protobuf or grpc")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter()  # endpoint, headers, timeout and compression from OTEL_EXPORTER_OTLP_*


def make_provider(exporter: SpanExporter, *, instance_id: str | None = None) -> tuple[TracerProvider, BatchSpanProcessor]:
    resource = Resource.create({  # merged with OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME, which win
        "service.name": os.environ.get("OTEL_SERVICE_NAME", "baton"),
        "service.version": _version(),
        "service.instance.id": instance_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
    })
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    processor = BatchSpanProcessor(exporter)
    provider.add_span_processor(processor)
    return provider, processor


@dataclass(slots=True)
class _Commit:
    run_id: str
    def_hash: str
    workflow: str
    version: str
    workflow_id: str | None
    event: Any
    rows: list[HistoryRow]


class RunSpans:
    """Spans of runs, from the history rows each commit wrote."""

    def __init__(self, provider: TracerProvider, processor: BatchSpanProcessor, store: Store, graphs: Any, *,
                 link_trigger: bool = False) -> None:
        self.provider, self.processor, self.store = provider, processor, store
        self._graph_of = graphs  # async def (def_hash) -> CompiledWorkflow
        self.link_trigger = link_trigger
        self._scope = InstrumentationScope("baton", _version())
        self._traces: OrderedDict[str, RunTrace] = OrderedDict()
        self._sampled: dict[str, bool] = {}
        self._queue: asyncio.Queue[_Commit | None] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self.dropped = 0
        self.exported = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="baton-run-spans")

    async def stop(self, flush_timeout_s: float | None = None) -> None:
        """Turn what is queued into spans, then flush the exporter for at most
        `flush_timeout_s`: an unreachable collector must not hold up shutdown (the batch
        processor would wait up to 30 s, each export retrying for its own 10 s)."""
        if self._task is not None:
            self._queue.put_nowait(None)
            await self._task
        # a daemon thread, not the loop's executor: asyncio.run waits for those at exit
        flusher = threading.Thread(target=self.provider.shutdown, name="baton-span-flush", daemon=True)
        flusher.start()
        timeout_s = FLUSH_TIMEOUT_S if flush_timeout_s is None else flush_timeout_s
        waited = await asyncio.to_thread(_joined, flusher, timeout_s)
        if not waited:
            log.warning("spans not exported within %.0f s of shutdown (is the OTLP collector reachable?)",
                        timeout_s)

    def committed(self, state: Any, rows: list[HistoryRow]) -> None:
        """Called by the pump after a commit, for each run it wrote history for."""
        if not rows:
            return
        if self._queue.qsize() >= MAX_QUEUED:
            self.dropped += 1
            return
        self._queue.put_nowait(_Commit(state.run_id, state.graph.def_hash, state.workflow, state.version,
                                       state.workflow_id, state.event, rows))

    async def _loop(self) -> None:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            try:
                await self._apply(item)
            except Exception:  # a span lost must never stop the next ones
                log.exception("spans of run %s could not be built", item.run_id)

    async def _apply(self, item: _Commit) -> None:
        rows = [(r.seq, r.at, r.type, r.key, orjson.loads(r.data)) for r in item.rows]
        trace = self._traces.pop(item.run_id, None)
        if trace is None or trace.seq != rows[0][0] - 1:
            trace = await self._rebuild(item, rows[0][0])
        closed = trace.feed(rows)
        sampled = bool(closed) and self._is_sampled(trace)  # before the run's entry may be dropped below
        if trace.run is None and not trace.open_spans():
            self._sampled.pop(item.run_id, None)  # the run ended: nothing more will come
        else:
            self._traces[item.run_id] = trace
            while len(self._traces) > MAX_OPEN_RUNS:
                old, _ = self._traces.popitem(last=False)
                self._sampled.pop(old, None)
        if sampled:
            for record in closed:
                self.processor.on_end(self.readable(trace, record))
            self.exported += len(closed)

    async def _rebuild(self, item: _Commit, first_seq: int) -> RunTrace:
        """The run's open spans as its earlier history leaves them (what they closed was exported then)."""
        graph: CompiledWorkflow | None
        try:
            graph = await self._graph_of(item.def_hash)
        except Exception:
            graph = None
        trace = RunTrace(item.run_id, graph, workflow=item.workflow, version=item.version,
                         workflow_id=item.workflow_id, event=item.event, link_trigger=self.link_trigger)
        after = 0
        while after < first_seq - 1:
            page = await self.store.history(item.run_id, after_seq=after, limit=HISTORY_PAGE)
            page = [r for r in page if r.seq < first_seq]
            if not page:
                break
            trace.feed([(r.seq, r.at, r.type, r.key, orjson.loads(r.data)) for r in page])
            after = page[-1].seq
        trace.seq = first_seq - 1
        return trace

    def _is_sampled(self, trace: RunTrace) -> bool:
        sampled = self._sampled.get(trace.run_id)
        if sampled is None:
            parent = None
            if trace.trigger_span is not None and not trace.link_trigger:  # linked: the run's trace is a root
                ctx = SpanContext(int(trace.trace_id, 16), int(trace.trigger_span, 16), is_remote=True,
                                  trace_flags=TraceFlags(TraceFlags.SAMPLED))
                parent = set_span_in_context(NonRecordingSpan(ctx))
            result = self.provider.sampler.should_sample(parent, int(trace.trace_id, 16), f"run {trace.workflow}")
            sampled = self._sampled[trace.run_id] = result.decision.is_sampled()
        return sampled

    def readable(self, trace: RunTrace, record: SpanRecord) -> ReadableSpan:
        return to_readable(trace.trace_id, record, self.provider.resource, self._scope)


def _joined(thread: threading.Thread, timeout_s: float) -> bool:
    thread.join(timeout_s)
    return not thread.is_alive()


def to_readable(trace_id: str, record: SpanRecord, resource: Resource, scope: InstrumentationScope) -> ReadableSpan:
    flags = TraceFlags(TraceFlags.SAMPLED)
    context = SpanContext(int(trace_id, 16), int(record.span_id, 16), is_remote=False, trace_flags=flags)
    parent = (SpanContext(int(trace_id, 16), int(record.parent_id, 16), is_remote=False, trace_flags=flags)
              if record.parent_id else None)
    if record.status == ERROR:  # error texts come from handlers: masked as the logs mask them
        status = Status(StatusCode.ERROR, redact(record.message) if record.message else None)
    elif record.status == OK:
        status = Status(StatusCode.OK)
    else:
        status = Status(StatusCode.UNSET)
    end = record.end if record.end is not None else record.start
    return ReadableSpan(
        name=record.name, context=context, parent=parent, resource=resource,
        attributes=_attrs(record.attributes),
        events=[SpanEvent(name, _attrs(redact_value(attrs)), int(at * 1e9)) for name, at, attrs in record.events],
        kind=_KINDS.get(record.kind, SpanKind.INTERNAL), status=status,
        start_time=int(record.start * 1e9), end_time=int(end * 1e9), instrumentation_scope=scope,
    )


def _attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """OpenTelemetry takes str, bool, int, float (or lists of one of them); drop the rest."""
    return {k: v for k, v in attrs.items() if isinstance(v, (str, bool, int, float))}
