"""Spans encoded by Baton itself (server/telemetry/otlp.py), batched and sent by
server/telemetry/export.py, compared with what the OpenTelemetry SDK makes and sends.

The reference is the SDK path Baton used before: each span record as a `ReadableSpan`,
encoded by the SDK's OTLP encoder. The bytes must be the same, so a collector sees the
same tree, attributes, events and status. The batches go to real receivers on
loopback: OTLP/HTTP (tests/otlp.py) and an OTLP/gRPC trace service.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from concurrent import futures
from typing import Any

import grpc
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event as SpanEvent
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

from server.definitions.loader import load_workflow_text
from server.telemetry import otlp
from server.telemetry.export import EncodedSpanProcessor
from server.telemetry.logs import redact, redact_value
from server.telemetry.trace import ERROR, OK, ROW_TYPES, RunTrace, SpanRecord
from server.telemetry.tracing import encode_record, make_exporter, make_provider
from tests.inproc import api_client, call
from tests.otlp import OtlpReceiver, _span
from tests.test_tracing import CALLER_SPAN, CALLER_TRACE, GATE, make_settings

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SCOPE = InstrumentationScope("baton", "1.2.3")
RESOURCE = Resource.create({"service.name": "baton", "service.instance.id": "host:1:abc", "deployment": "test"})

# --- the reference: the SDK path Baton took before ----------------------------------------------

_KINDS = {"internal": SpanKind.INTERNAL, "producer": SpanKind.PRODUCER, "consumer": SpanKind.CONSUMER}


def _attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if isinstance(v, (str, bool, int, float))}


def to_readable(trace_id: str, record: SpanRecord) -> ReadableSpan:
    flags = TraceFlags(TraceFlags.SAMPLED)
    context = SpanContext(int(trace_id, 16), int(record.span_id, 16), is_remote=False, trace_flags=flags)
    parent = (SpanContext(int(trace_id, 16), int(record.parent_id, 16), is_remote=False, trace_flags=flags)
              if record.parent_id else None)
    if record.status == ERROR:
        status = Status(StatusCode.ERROR, redact(record.message) if record.message else None)
    elif record.status == OK:
        status = Status(StatusCode.OK)
    else:
        status = Status(StatusCode.UNSET)
    end = record.end if record.end is not None else record.start
    return ReadableSpan(
        name=record.name, context=context, parent=parent, resource=RESOURCE, attributes=_attrs(record.attributes),
        events=[SpanEvent(name, _attrs(redact_value(attrs)), int(at * 1e9)) for name, at, attrs in record.events],
        kind=_KINDS.get(record.kind, SpanKind.INTERNAL), status=status,
        start_time=int(record.start * 1e9), end_time=int(end * 1e9), instrumentation_scope=SCOPE,
    )


def sdk_span_bytes(trace_id: str, record: SpanRecord) -> bytes:
    (rs,) = encode_spans([to_readable(trace_id, record)]).resource_spans
    return rs.scope_spans[0].spans[0].SerializeToString()


# --- a run with every kind of span, event and status ---------------------------------------------

SAGA = """
name: saga
steps:
  - {id: book, task: echo, compensate: {task: echo}}
  - id: each
    map:
      items: "[1, 2]"
      steps: [{id: item, task: noop}]
  - {id: remote, task: noop, queue: gpu}
  - {id: slow, task: noop, timeout: 1s}
  - {id: gate, wait_for_signal: {signal: go}}
  - {id: ok, wait_for_signal: {approval: {message: ok?}}}
  - {id: pay, task: fail, retry: {max_attempts: 2}}
"""


def saga_records() -> list[SpanRecord]:
    """The spans of a run: fan-out in a map, a retried failure with a masked error, a
    producer step, a timed-out attempt, a signal wait, an approval, a compensation."""
    graph = load_workflow_text(SAGA, "saga.yaml").compiled
    trace = RunTrace("r-1", graph, workflow="saga", version="7", workflow_id="order-9",
                     event={"traceparent": f"00-{TRACE}-{CALLER_SPAN}-01"})
    records = trace.feed(saga_rows())
    assert trace.run is None and not trace.open_spans()
    return records


def saga_rows() -> list[tuple[int, float, str, str | None, dict[str, Any]]]:
    run = "r-1"
    rows = [
        (100.0, "run.started", None, {"by": "ci"}),
        (100.0, "run.running", None, {"attempt": 1}),
        (100.1, "step.scheduled", "book", {"task_id": f"{run}:book:1", "attempt": 1, "handler": "echo"}),
        (100.2, "task.succeeded", "book", {"task_id": f"{run}:book:1"}),
        (100.2, "step.succeeded", "book", {"output": {"big": "x" * 100}}),
        (100.3, "step.scheduled", "each[0]/item", {"task_id": f"{run}:each[0]/item:1", "attempt": 1, "handler": "noop"}),
        (100.3, "step.scheduled", "each[1]/item", {"task_id": f"{run}:each[1]/item:1", "attempt": 1, "handler": "noop"}),
        (100.4, "task.succeeded", "each[0]/item", {"task_id": f"{run}:each[0]/item:1"}),
        (100.5, "task.succeeded", "each[1]/item", {"task_id": f"{run}:each[1]/item:1"}),
        (100.6, "step.scheduled", "remote", {"task_id": f"{run}:remote:1", "attempt": 1, "handler": "noop", "queue": "gpu"}),
        (100.7, "task.succeeded", "remote", {"task_id": f"{run}:remote:1"}),
        (100.8, "step.scheduled", "slow", {"task_id": f"{run}:slow:1", "attempt": 1, "handler": "noop"}),
        (101.8, "timer.fired", None, {"timer_id": "timeout:slow:1"}),
        (101.9, "step.waiting", "gate", {"signal": "go"}),
        (102.0, "signal.received", None, {"name": "go", "by": "ünïcode ✓"}),
        (102.1, "approval.requested", "ok", {}),
        (102.2, "approval.decided", "ok", {"decision": "approve", "by": None}),
        (102.3, "step.scheduled", "pay", {"task_id": f"{run}:pay:1", "attempt": 1, "handler": "fail"}),
        (102.4, "task.failed", "pay", {"task_id": f"{run}:pay:1",
                                           "error": {"type": "HttpError", "message": "password=hunter22 " + "x" * 300}}),
        (102.4, "step.retrying", "pay", {"delay_s": 0.25}),
        (102.7, "run.compensating", None, {"steps": ["book"]}),
        (102.8, "compensation.scheduled", "book", {"task_id": f"{run}:book:compensate:1", "attempt": 1, "handler": "echo"}),
        (102.9, "task.succeeded", "book", {"task_id": f"{run}:book:compensate:1"}),
        (103.0, "run.compensated", None, {"error": {"type": "HttpError", "message": "Bearer abcdefghijklmnop"}}),
    ]
    return [(seq, *row) for seq, row in enumerate(rows, 1)]


def test_rows_left_undecoded_change_no_span():
    """The span task decodes only the rows RunTrace reads (ROW_TYPES): the same history,
    every other row's data withheld and rows RunTrace ignores added, gives the same spans."""
    full = saga_records()
    graph = load_workflow_text(SAGA, "saga.yaml").compiled
    trace = RunTrace("r-1", graph, workflow="saga", version="7", workflow_id="order-9",
                     event={"traceparent": f"00-{TRACE}-{CALLER_SPAN}-01"})
    rows = [(seq, at, type_, key, data if type_ in ROW_TYPES else None) for seq, at, type_, key, data in saga_rows()]
    assert [type_ for _, _, type_, _, data in rows if data is None] == ["run.running", "step.succeeded"]
    assert trace.feed(rows) == full


def test_the_saga_covers_every_shape():
    records = saga_records()
    names = {r.name for r in records}
    assert {"run saga", "step book", "step each", "step item", "step remote", "step slow", "signal go",
            "approval ok", "step pay", "compensate book"} <= names
    assert {r.kind for r in records} == {"internal", "producer"}
    assert {r.status for r in records} == {"ok", "error", "unset"}
    assert any(e[0] == "retry scheduled" for r in records for e in r.events)
    assert any(r.parent_id == CALLER_SPAN for r in records)  # the run under its trigger


def test_each_span_is_the_bytes_the_sdk_encoder_makes():
    trace_id = bytes.fromhex(TRACE)
    for record in saga_records():
        assert encode_record(trace_id, record) == sdk_span_bytes(TRACE, record), record.name


def test_an_export_request_is_what_the_sdk_exporter_sends():
    records = saga_records()
    spans = [otlp.scope_span(encode_record(bytes.fromhex(TRACE), r)) for r in records]
    mine = otlp.export_request(otlp.resource(RESOURCE.attributes), [(otlp.scope(SCOPE.name, SCOPE.version), spans)])
    theirs = encode_spans([to_readable(TRACE, r) for r in records])
    assert ExportTraceServiceRequest.FromString(mine) == theirs
    assert mine == theirs.SerializeToString()


def test_error_texts_are_masked_in_the_encoded_span():
    record = [r for r in saga_records() if r.name == "step pay"][0]
    span = PbSpan.FromString(encode_record(bytes.fromhex(TRACE), record))
    assert span.status.message.startswith("HttpError: password=[redacted]")
    assert "hunter22" not in str(span)


_values = st.one_of(
    st.text(max_size=200), st.booleans(), st.integers(min_value=-2**63, max_value=2**63 - 1),
    st.floats(allow_nan=False), st.lists(st.integers(min_value=-2**63, max_value=2**63 - 1), max_size=3),
    st.lists(st.text(max_size=5), max_size=3),
)
_attributes = st.dictionaries(st.text(min_size=1, max_size=40), _values, max_size=8)


@settings(max_examples=150, deadline=None)
@given(name=st.text(max_size=300), attributes=_attributes, start=st.integers(min_value=1, max_value=2**62),
       length=st.integers(min_value=0, max_value=10**12), status=st.sampled_from([0, 1, 2]),
       message=st.text(max_size=150), parent=st.booleans(), remote=st.booleans(),
       events=st.lists(st.tuples(st.text(max_size=20), _attributes), max_size=3),
       kind=st.sampled_from(list(SpanKind)))
def test_any_span_encodes_as_the_sdk_encodes_it(name, attributes, start, length, status, message, parent, remote,
                                                events, kind):
    trace_id, span_id, parent_id = 0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, 0x00F067AA0BA902B7
    parent_context = SpanContext(trace_id, parent_id, is_remote=remote) if parent else None
    description = message if status == 2 else None  # the SDK keeps a description on errors only
    sdk = ReadableSpan(name=name, context=SpanContext(trace_id, span_id, is_remote=False), parent=parent_context,
                       attributes=attributes, events=[SpanEvent(n, a, start + i) for i, (n, a) in enumerate(events)],
                       kind=kind, status=Status(StatusCode(status), description), start_time=start,
                       end_time=start + length, resource=RESOURCE, instrumentation_scope=SCOPE)
    (rs,) = encode_spans([sdk]).resource_spans
    flags = otlp.FLAG_HAS_IS_REMOTE | (otlp.FLAG_IS_REMOTE if parent and remote else 0)
    mine = otlp.span(trace_id.to_bytes(16, "big"), span_id.to_bytes(8, "big"),
                     parent_id.to_bytes(8, "big") if parent else None, name, kind.value + 1, start, start + length,
                     attributes, [(n, start + i, a) for i, (n, a) in enumerate(events)], status, description, flags)
    assert PbSpan.FromString(mine) == rs.scope_spans[0].spans[0]
    assert mine == rs.scope_spans[0].spans[0].SerializeToString()


# --- batches to real receivers --------------------------------------------------------------------

class Receiver(OtlpReceiver):
    """The OTLP/HTTP receiver, which also keeps each request's headers and raw spans, and
    can hold its answers back (a slow collector)."""

    def __init__(self) -> None:
        super().__init__()
        self.headers: list[Any] = []
        self.raw: list[Any] = []
        self.answer = threading.Event()
        self.answer.set()
        self.got_request = threading.Event()

    async def _traces(self, request: web.Request) -> web.Response:
        body = ExportTraceServiceRequest()
        body.ParseFromString(await request.read())
        self.headers.append(request.headers.copy())  # case-insensitive
        self.raw += [s for rs in body.resource_spans for ss in rs.scope_spans for s in ss.spans]
        self.got_request.set()
        await asyncio.to_thread(self.answer.wait, 10)
        return await super()._traces(request)  # it reads the body again: aiohttp keeps it


@pytest.fixture
def receiver(monkeypatch):
    r = Receiver().start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", r.endpoint)
    yield r
    r.answer.set()
    r.stop()


def _spans(n: int, scope: bytes = otlp.scope("baton", "1")) -> list[tuple[bytes, bytes]]:
    trace_id = bytes.fromhex(TRACE)
    return [(scope, encode_record(trace_id, SpanRecord(f"{i + 1:016x}", None, f"span {i}", 1.0 + i, 2.0 + i,
                                                       attributes={"baton.run.id": "r-1", "i": i})))
            for i in range(n)]


def test_full_batches_go_at_once_and_the_rest_at_shutdown(receiver, monkeypatch):
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "3")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")  # ms: only a full batch or shutdown sends
    processor = EncodedSpanProcessor(make_exporter(), RESOURCE)
    for scope, span in _spans(7):
        processor.add(scope, span)
    spans = receiver.wait_for(lambda s: len(s) == 6, "two full batches")
    assert receiver.requests == 2
    processor.shutdown()
    spans = receiver.snapshot()
    assert receiver.requests == 3 and sorted(s["name"] for s in spans) == [f"span {i}" for i in range(7)]
    assert {s["attributes"]["baton.run.id"] for s in spans} == {"r-1"} and spans[0]["resource"]["deployment"] == "test"
    assert processor.exported == 7 and processor.failed == 0


def test_a_batch_takes_spans_of_several_scopes(receiver, monkeypatch):
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "3")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
    processor = EncodedSpanProcessor(make_exporter(), RESOURCE)
    runs, api = _spans(2, otlp.scope("baton", "1")), _spans(2, otlp.scope("baton.api", "1"))
    for scope, span in runs + api:
        processor.add(scope, span)
    receiver.wait_for(lambda s: len(s) == 3, "one full batch, of both scopes")
    processor.shutdown()
    assert receiver.requests == 2 and len(receiver.snapshot()) == 4 and processor.exported == 4


def test_spans_wait_at_most_the_schedule_delay(receiver, monkeypatch):
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
    processor = EncodedSpanProcessor(make_exporter(), RESOURCE)
    try:
        for scope, span in _spans(2):
            processor.add(scope, span)
        receiver.wait_for(lambda s: len(s) == 2, "a batch smaller than the batch size, after the delay")
    finally:
        processor.shutdown()


def test_force_flush_sends_everything_queued(receiver, monkeypatch):
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
    processor = EncodedSpanProcessor(make_exporter(), RESOURCE)
    try:
        for scope, span in _spans(5):
            processor.add(scope, span)
        assert processor.force_flush(10_000)
        assert len(receiver.snapshot()) == 5
    finally:
        processor.shutdown()


def test_a_full_queue_drops_new_spans_and_counts_them(receiver, monkeypatch):
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2")
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "4")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
    receiver.answer.clear()  # the collector is slow: the first batch stays in flight
    processor = EncodedSpanProcessor(make_exporter(), RESOURCE)
    spans = _spans(7)
    for scope, span in spans[:2]:
        processor.add(scope, span)
    assert receiver.got_request.wait(10), "the first batch was not sent"
    for scope, span in spans[2:]:
        processor.add(scope, span)
    assert processor.dropped == 1  # four wait, the fifth is one too many
    receiver.answer.set()
    processor.shutdown()
    assert sorted(s["name"] for s in receiver.snapshot()) == [f"span {i}" for i in range(6)]
    processor.add(*spans[6])  # closed: dropped too
    assert processor.dropped == 2


def test_the_exporter_settings_still_apply(receiver, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=acme,authorization=Bearer%20t0k3n")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    processor = EncodedSpanProcessor(make_exporter(), RESOURCE)
    for scope, span in _spans(2):
        processor.add(scope, span)
    processor.shutdown()
    assert len(receiver.snapshot()) == 2  # the receiver could decode it
    headers = receiver.headers[0]
    assert headers["x-tenant"] == "acme" and headers["authorization"] == "Bearer t0k3n"
    assert headers["Content-Encoding"] == "gzip" and headers["Content-Type"] == "application/x-protobuf"


def test_sdk_spans_of_the_provider_join_the_batches_and_unsampled_ones_do_not(receiver, monkeypatch):
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
    provider, processor = make_provider(make_exporter(), instance_id="test:1")
    tracer = provider.get_tracer("handler.lib", "9")
    with tracer.start_as_current_span("fetch", attributes={"http.request.method": "GET"}):
        pass
    scope, span = _spans(1)[0]
    processor.add(scope, span)
    provider.shutdown()
    spans = {s["name"]: s for s in receiver.snapshot()}
    assert sorted(spans) == ["fetch", "span 0"]
    assert spans["fetch"]["attributes"] == {"http.request.method": "GET"}
    assert spans["fetch"]["resource"]["service.instance.id"] == "test:1" == spans["span 0"]["resource"]["service.instance.id"]


def test_an_exporter_that_cannot_send_bytes_is_refused():
    from opentelemetry.sdk.trace.export import ConsoleSpanExporter

    with pytest.raises(TypeError, match="ConsoleSpanExporter cannot send encoded spans"):
        EncodedSpanProcessor(ConsoleSpanExporter(), RESOURCE)


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.metadata: list[dict[str, str]] = []

    def Export(self, request, context):  # noqa: N802 (the service's method name)
        self.requests.append(request)
        self.metadata.append(dict(context.invocation_metadata()))
        return ExportTraceServiceResponse()


@pytest.fixture
def grpc_receiver(monkeypatch):
    service = _TraceService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(service, server)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=acme")
    yield service
    server.stop(None).wait(10)


def test_over_grpc_the_collector_gets_what_the_sdk_would_send(grpc_receiver, monkeypatch):
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
    records = saga_records()
    processor = EncodedSpanProcessor(make_exporter(), RESOURCE)
    for record in records:
        processor.add(otlp.scope(SCOPE.name, SCOPE.version), encode_record(bytes.fromhex(TRACE), record))
    processor.shutdown()
    assert processor.exported == len(records)
    (request,) = grpc_receiver.requests
    assert request == encode_spans([to_readable(TRACE, r) for r in records])
    assert grpc_receiver.metadata[0]["x-tenant"] == "acme"


# --- request spans ---------------------------------------------------------------------------------

@pytest.fixture
def http_receiver(monkeypatch):
    r = Receiver().start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", r.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    yield r
    r.stop()


CHAIN = "name: chain\nsteps:\n  - {id: a, task: noop}\n"


async def test_an_unsampled_caller_gets_no_spans_of_its_request_or_run(tmp_path, http_receiver, monkeypatch):
    monkeypatch.chdir(tmp_path)
    async with api_client(make_settings(tmp_path, {"chain": CHAIN})) as client:
        unsampled = await call(client, "POST", "/v1/workflows/chain/runs", expect=201, json={"input": {}},
                               headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"})
        sampled = await call(client, "POST", "/v1/workflows/chain/runs", expect=201, json={"input": {}},
                             headers={"traceparent": f"00-{'1' * 32}-{CALLER_SPAN}-01"})
        for run in (unsampled, sampled):
            await call(client, "GET", f"/v1/runs/{run['run_id']}/wait?timeout=10")
    # the server has stopped and flushed: what was to be sent was sent
    spans = http_receiver.snapshot()
    assert {s["name"] for s in http_receiver.run_spans(sampled["run_id"])} == {"run chain", "step a"}
    assert [s for s in spans if s["trace_id"] == CALLER_TRACE] == []
    assert http_receiver.run_spans(unsampled["run_id"]) == []


async def test_a_request_span_keeps_the_callers_trace_state_and_a_4xx_is_not_an_error(tmp_path, http_receiver,
                                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    async with api_client(make_settings(tmp_path, {"gate": GATE})) as client:
        await call(client, "GET", "/v1/runs/nosuchrun", expect=404,
                   headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01", "tracestate": "vendor=abc,x=1"})
        await http_receiver.await_for(lambda s: any(x["kind"] == "server" for x in s), "the request span")
    (raw,) = http_receiver.raw
    span = _span({}, raw)
    assert span["name"] == "GET /v1/runs/{run_id}" and span["kind"] == "server"
    assert (span["trace_id"], span["parent_id"]) == (CALLER_TRACE, CALLER_SPAN)
    assert span["attributes"] == {"http.request.method": "GET", "url.path": "/v1/runs/nosuchrun", "url.scheme": "http",
                                  "http.route": "/v1/runs/{run_id}", "http.response.status_code": 404}
    assert span["status"] == "unset" and span["end"] >= span["start"]
    assert raw.trace_state == "vendor=abc,x=1"
    assert raw.flags == otlp.FLAG_HAS_IS_REMOTE | otlp.FLAG_IS_REMOTE  # its parent came from another process


async def test_with_sampling_off_nothing_is_exported(tmp_path, http_receiver, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    async with api_client(make_settings(tmp_path, {"chain": CHAIN})) as client:
        run = await call(client, "POST", "/v1/workflows/chain/runs", expect=201, json={"input": {}})
        done = await call(client, "GET", f"/v1/runs/{run['run_id']}/wait?timeout=10")
        assert done["status"] == "succeeded"
        detail = await call(client, "GET", f"/v1/runs/{run['run_id']}")
    assert http_receiver.snapshot() == [] and http_receiver.requests == 0
    assert detail["trace_id"]  # the run still names its trace (log lines carry it)


@pytest.mark.parametrize("name", ["ALWAYS_ON", "ALWAYS_OFF", "DEFAULT_ON", "DEFAULT_OFF"])
def test_the_shortcut_decides_as_the_standard_sampler_would(name):
    from opentelemetry.sdk.trace import sampling
    from opentelemetry.trace import NonRecordingSpan, set_span_in_context

    from server.telemetry.tracing import parent_decision

    sampler = getattr(sampling, name)
    decide = parent_decision(sampler)
    for parent in (None, True, False):
        context = None
        if parent is not None:
            flags = TraceFlags(TraceFlags.SAMPLED if parent else TraceFlags.DEFAULT)
            context = set_span_in_context(NonRecordingSpan(SpanContext(int(TRACE, 16), 7, is_remote=True, trace_flags=flags)))
        expected = sampler.should_sample(context, int(TRACE, 16), "run x").decision.is_sampled()
        assert decide(parent) is expected, (name, parent)


def test_any_other_sampler_is_asked_each_time():
    from opentelemetry.sdk.trace import sampling

    from server.telemetry.tracing import parent_decision

    assert parent_decision(sampling.ParentBasedTraceIdRatio(0.5)) is None
    assert parent_decision(sampling.TraceIdRatioBased(1.0)) is None
