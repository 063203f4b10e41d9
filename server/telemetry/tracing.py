"""OpenTelemetry tracing: the provider, the OTLP exporter, and the spans of runs.

Set-up follows the standard `OTEL_*` environment variables: the exporter's
endpoint, headers and protocol (`OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`: http/protobuf,
the default, or grpc), the sampler (`OTEL_TRACES_SAMPLER[_ARG]`), the batching
(`OTEL_BSP_*`), the service name and resource attributes. `OTEL_SDK_DISABLED=true`
or `tracing.enabled: false` switch tracing off; by default it is on when an OTLP
endpoint is configured.

Run spans are not made with a tracer: the pump hands each commit's history rows to
`RunSpans.committed` (cheap: a list append), and a background task turns them into
spans with server/telemetry/trace.py, with the ids and times the records give. So a
span survives a restart (it is rebuilt from history), and a wait of three days is
one span of three days, exported when it ends. A finished span is encoded at once
into OTLP protobuf bytes (server/telemetry/otlp.py) and queued for the batch
processor (server/telemetry/export.py), whose thread sends it with the standard OTLP
exporter: no SDK span, no SDK encoder on the way, which were most of what tracing
cost. API requests get their spans the same way (server/telemetry/http.py), through
the same provider, whose sampler and id generator decide as the SDK's tracer would.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter
from opentelemetry.sdk.trace import sampling
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, set_span_in_context

from server.engine.graph import CompiledWorkflow
from server.store.base import HistoryRow, Store
from server.telemetry import otlp
from server.telemetry.export import EncodedSpanProcessor
from server.telemetry.logs import redact, redact_value
from server.telemetry.trace import ERROR, OK, ROW_TYPES, RunTrace, SpanRecord

log = logging.getLogger("baton.tracing")

# Runs whose open spans are kept in memory between commits; a run beyond this is
# rebuilt from its history when its next rows come (one read).
MAX_OPEN_RUNS = 10_000
# Commits waiting for the span task; beyond this, spans are dropped (and counted) rather than hold up the pump.
MAX_QUEUED = 100_000
HISTORY_PAGE = 1000
# At shutdown, how long the last spans may take to reach the collector.
FLUSH_TIMEOUT_S = 5.0
_KINDS = {"internal": otlp.KIND_INTERNAL, "producer": otlp.KIND_PRODUCER, "consumer": otlp.KIND_CONSUMER}
_STATUS = {OK: otlp.STATUS_OK, ERROR: otlp.STATUS_ERROR}
_RECORD_AND_SAMPLE = sampling.Decision.RECORD_AND_SAMPLE


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
    # imported here: the one chosen only (gRPC's takes a noticeable part of a second to import)
    if protocol == "grpc":
        from server.telemetry.otlp_grpc import GrpcSpanExporter

        return GrpcSpanExporter()
    if protocol != "http/protobuf":
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: use http/protobuf or grpc")
    from server.telemetry.otlp_http import HttpSpanExporter

    return HttpSpanExporter()  # endpoint, headers, timeout and compression from OTEL_EXPORTER_OTLP_*


class BatonTracerProvider(TracerProvider):
    """The SDK's provider (resource, sampler and id generator, from OTEL_*), whose one span
    processor takes Baton's own spans encoded already; spans made with its tracers join them."""

    def __init__(self, resource: Resource, processor: EncodedSpanProcessor) -> None:
        super().__init__(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
        self.processor = processor
        self.add_span_processor(processor)


def parent_decision(sampler: sampling.Sampler) -> Callable[[bool | None], bool] | None:
    """The decision of the SDK's standard samplers that decide on the parent's sampled flag
    alone (OTEL_TRACES_SAMPLER=always_on, always_off, parentbased_always_on, the default,
    parentbased_always_off: each is one SDK object), as a function of that flag (None: no
    parent). None for any other sampler, which is asked each time. Asking costs a context,
    a span context and a SamplingResult: a tenth of a run's spans."""
    if sampler is sampling.ALWAYS_ON:
        return lambda parent: True
    if sampler is sampling.ALWAYS_OFF:
        return lambda parent: False
    if sampler is sampling.DEFAULT_ON:
        return lambda parent: True if parent is None else parent
    if sampler is sampling.DEFAULT_OFF:
        return lambda parent: False if parent is None else parent
    return None


def make_provider(exporter: SpanExporter, *, instance_id: str | None = None) -> tuple[BatonTracerProvider, EncodedSpanProcessor]:
    resource = Resource.create({  # merged with OTEL_RESOURCE_ATTRIBUTES / OTEL_SERVICE_NAME, which win
        "service.name": os.environ.get("OTEL_SERVICE_NAME", "baton"),
        "service.version": _version(),
        "service.instance.id": instance_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
    })
    processor = EncodedSpanProcessor(exporter, resource)
    return BatonTracerProvider(resource, processor), processor


@dataclass(slots=True)
class _Commit:
    run_id: str
    graph: CompiledWorkflow | None
    def_hash: str
    workflow: str
    version: str
    workflow_id: str | None
    event: Any
    rows: list[HistoryRow]


class RunSpans:
    """Spans of runs, from the history rows each commit wrote."""

    def __init__(self, provider: TracerProvider, processor: EncodedSpanProcessor, store: Store, graphs: Any, *,
                 link_trigger: bool = False) -> None:
        self.provider, self.processor, self.store = provider, processor, store
        self._graph_of = graphs  # async def (def_hash) -> CompiledWorkflow, for a commit without its graph
        self.link_trigger = link_trigger
        self._scope = otlp.scope("baton", _version())
        self._decide = parent_decision(provider.sampler)
        self._traces: OrderedDict[str, RunTrace] = OrderedDict()
        self._sampled: dict[str, bool] = {}
        # commits not yet made spans of: the pump appends, the task takes them all at once
        self._pending: list[_Commit] = []
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task | None = None
        self.dropped = 0
        self.exported = 0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="baton-run-spans")

    async def stop(self, flush_timeout_s: float | None = None) -> None:
        """Turn what is queued into spans, then flush the exporter for at most
        `flush_timeout_s`: an unreachable collector must not hold up shutdown (each export
        retries for its own 10 s)."""
        if self._task is not None:
            self._stopping = True
            self._wake.set()
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
        if len(self._pending) >= MAX_QUEUED:
            self.dropped += 1
            return
        self._pending.append(_Commit(state.run_id, state.graph, state.graph.def_hash, state.workflow, state.version,
                                     state.workflow_id, state.event, rows))
        if len(self._pending) == 1:  # the task sleeps only when nothing is pending
            self._wake.set()

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            pending, self._pending = self._pending, []
            for item in pending:
                try:
                    rows = _decoded(item.rows)
                    trace = self._traces.pop(item.run_id, None)
                    if trace is None or trace.seq != rows[0][0] - 1:
                        trace = await self._rebuild(item, rows[0][0])
                    self._apply(item.run_id, trace, rows)
                except Exception:  # a span lost must never stop the next ones
                    log.exception("spans of run %s could not be built", item.run_id)
            if self._stopping and not self._pending:
                return

    def _apply(self, run_id: str, trace: RunTrace, rows: list[tuple[int, float, str, str | None, Any]]) -> None:
        closed = trace.feed(rows)
        sampled = bool(closed) and self._is_sampled(trace)  # before the run's entry may be dropped below
        if trace.run is None and not trace.open_spans():
            self._sampled.pop(run_id, None)  # the run ended: nothing more will come
        else:
            self._traces[run_id] = trace
            while len(self._traces) > MAX_OPEN_RUNS:
                old, _ = self._traces.popitem(last=False)
                self._sampled.pop(old, None)
        if sampled:
            trace_id = bytes.fromhex(trace.trace_id)
            for record in closed:
                self.processor.add(self._scope, encode_record(trace_id, record))
            self.exported += len(closed)
        # closed attempts are kept for a `retry scheduled` event; once exported, one would
        # reach nobody, and they would only live on (and age into the oldest GC generation)
        trace.last_closed.clear()

    async def _rebuild(self, item: _Commit, first_seq: int) -> RunTrace:
        """The run's open spans as its earlier history leaves them (what they closed was exported
        then); for a new run, the first commit's, an empty trace."""
        graph: CompiledWorkflow | None = item.graph
        if graph is None:
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
            trace.feed(_decoded(page))
            after = page[-1].seq
        trace.seq = first_seq - 1
        return trace

    def _is_sampled(self, trace: RunTrace) -> bool:
        sampled = self._sampled.get(trace.run_id)
        if sampled is None:
            sampled = self._sampled[trace.run_id] = self._decide_run(trace)
        return sampled

    def _decide_run(self, trace: RunTrace) -> bool:
        # the trigger's own decision, from its traceparent's flags: a caller that did not sample
        # its span does not get the run's spans either (parent-based samplers); linked, the
        # run's trace is a root
        parent = trace.trigger_sampled if trace.trigger_span is not None and not trace.link_trigger else None
        if self._decide is not None:
            return self._decide(parent)
        context = None
        if parent is not None:
            flags = TraceFlags(TraceFlags.SAMPLED if parent else TraceFlags.DEFAULT)
            span = SpanContext(int(trace.trace_id, 16), int(trace.trigger_span, 16), is_remote=True, trace_flags=flags)
            context = set_span_in_context(NonRecordingSpan(span))
        result = self.provider.sampler.should_sample(context, int(trace.trace_id, 16), f"run {trace.workflow}")
        return result.decision is _RECORD_AND_SAMPLE  # is_sampled(), without an enum look-up


def _joined(thread: threading.Thread, timeout_s: float) -> bool:
    thread.join(timeout_s)
    return not thread.is_alive()


def _decoded(rows: list[HistoryRow]) -> list[tuple[int, float, str, str | None, Any]]:
    """Rows as RunTrace takes them; the data of rows it does not read is left undecoded."""
    return [(r.seq, r.at, r.type, r.key, orjson.loads(r.data) if r.type in ROW_TYPES else None) for r in rows]


def encode_record(trace_id: bytes, record: SpanRecord) -> bytes:
    """A span record as an OTLP Span message (otlp.py); `trace_id` is the run's, as 16 bytes."""
    status = _STATUS.get(record.status, otlp.STATUS_UNSET)
    # error texts come from handlers: masked as the logs mask them
    message = redact(record.message) if status == otlp.STATUS_ERROR and record.message else None
    end = record.end if record.end is not None else record.start
    events = [(name, int(at * 1e9), redact_value(attrs)) for name, at, attrs in record.events] if record.events else ()
    return otlp.span(trace_id, bytes.fromhex(record.span_id), bytes.fromhex(record.parent_id) if record.parent_id else None,
                     record.name, _KINDS.get(record.kind, otlp.KIND_INTERNAL), int(record.start * 1e9), int(end * 1e9),
                     record.attributes, events, status, message)
