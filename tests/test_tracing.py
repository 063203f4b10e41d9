"""Traces of runs, exported over OTLP/HTTP to a real receiver on loopback.

The server exports with the standard OTLP exporter, configured the standard way
(OTEL_EXPORTER_OTLP_ENDPOINT); the receiver decodes what arrives with
opentelemetry-proto. Every wait is for a condition, bounded.
"""

from __future__ import annotations

from typing import Any

import nats
import pytest
from aiohttp import web

from server.settings import Settings
from server.telemetry.ids import run_span_id, task_span_id
from server.telemetry.tracing import make_exporter, tracing_enabled
from tests.inproc import api_client, call, eventually
from tests.otlp import OtlpReceiver
from tests.serverproc import ServerProcess

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
CALLER = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"

SAGA = """
name: saga
steps:
  - id: book
    task: echo
    input: {what: room}
    compensate: {task: echo, input: {undo: room}}
  - id: checks
    parallel:
      left: [{id: ping, task: noop}]
      right: [{id: pong, task: noop}]
  - id: pay
    task: fail
    retry: {max_attempts: 2, initial_delay: 10ms}
"""

GATE = """
name: gate
steps:
  - {id: first, task: noop}
  - {id: wait, wait_for_signal: {signal: go}}
  - {id: last, task: noop}
"""


@pytest.fixture
def receiver(monkeypatch):
    r = OtlpReceiver().start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", r.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # ms: export promptly, the tests wait for it
    yield r
    r.stop()


def make_settings(tmp_path, workflows: dict[str, str], **overrides: Any) -> Settings:
    wf = tmp_path / "wf"
    wf.mkdir(exist_ok=True)
    for name, text in workflows.items():
        (wf / f"{name}.yaml").write_text(text)
    base: dict[str, Any] = dict(data_dir=tmp_path / "data", workflows=[wf], handler_modules=[],
                                auth={"enabled": False}, nats={"enabled": False}, limits={"shutdown_grace_s": 0.5},
                                tracing={"enabled": True})
    return Settings(**{**base, **overrides})


def by_name(spans: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        out.setdefault(s["name"], []).append(s)
    return out


async def test_a_saga_run_is_one_tree_of_attempts_fan_out_and_compensation(tmp_path, receiver, monkeypatch):
    monkeypatch.chdir(tmp_path)
    async with api_client(make_settings(tmp_path, {"saga": SAGA})) as client:
        run = await call(client, "POST", "/v1/workflows/saga/runs", expect=201, json={"input": {}})
        run_id = run["run_id"]
        done = await call(client, "GET", f"/v1/runs/{run_id}/wait?timeout=10")
        assert done["status"] == "compensated"
        spans = await receiver.await_for(lambda s: any(x["name"] == "run saga" for x in s), "the run span")
    spans = [s for s in spans if s["attributes"].get("baton.run.id") == run_id]
    names = by_name(spans)
    assert sorted(names) == ["compensate book", "run saga", "step book", "step checks", "step pay", "step ping", "step pong"]
    (root,) = names["run saga"]
    # the API call that started it is the run's parent: its trace is the run's
    (request,) = [s for s in receiver.snapshot() if s["kind"] == "server" and s["span_id"] == root["parent_id"]]
    assert request["name"] == "POST /v1/workflows/{name}/runs"
    assert request["attributes"]["http.response.status_code"] == 201
    assert {s["trace_id"] for s in spans} == {request["trace_id"]}  # one trace
    assert root["span_id"] == run_span_id(run_id, 1)
    assert root["status"] == "error" and root["attributes"]["baton.outcome"] == "compensated"
    assert root["attributes"]["baton.workflow.name"] == "saga" and root["attributes"]["baton.workflow.version"] == "1"
    assert any(e["name"] == "compensating" for e in root["events"])
    # the fan-out: both branches under the parallel step, which is under the run
    (checks,) = names["step checks"]
    assert checks["parent_id"] == root["span_id"]
    assert {s["parent_id"] for s in names["step ping"] + names["step pong"]} == {checks["span_id"]}
    assert checks["start"] <= min(s["start"] for s in names["step ping"] + names["step pong"])
    assert checks["end"] >= max(s["end"] for s in names["step ping"] + names["step pong"])
    # the retried step: two attempt spans, both errors, the first with a retry event
    pay = sorted(names["step pay"], key=lambda s: s["attributes"]["baton.step.attempt"])
    assert [s["attributes"]["baton.step.attempt"] for s in pay] == [1, 2]
    assert all(s["parent_id"] == root["span_id"] and s["status"] == "error" for s in pay)
    assert [e["name"] for e in pay[0]["events"]] == ["exception", "retry scheduled"]
    assert pay[0]["events"][1]["attributes"]["baton.retry.delay_s"] > 0
    assert pay[0]["events"][0]["attributes"]["exception.type"] == "HandlerFailed"
    assert pay[0]["attributes"]["baton.task.id"] == f"{run_id}:pay:1"
    assert pay[0]["span_id"] == task_span_id(f"{run_id}:pay:1")
    assert pay[0]["attributes"]["baton.step.kind"] == "task"
    # the compensation, under the run, after the failure
    (comp,) = names["compensate book"]
    assert comp["parent_id"] == root["span_id"] and comp["status"] == "ok"
    assert comp["start"] >= pay[1]["end"]
    assert comp["resource"]["service.name"] == "baton"
    assert "service.instance.id" in comp["resource"]


async def test_a_traceparent_on_the_api_call_puts_the_run_in_the_callers_trace(tmp_path, receiver, monkeypatch):
    monkeypatch.chdir(tmp_path)
    async with api_client(make_settings(tmp_path, {"gate": GATE})) as client:
        run = await call(client, "POST", "/v1/workflows/gate/runs", expect=201, json={"input": {}},
                         headers={"traceparent": CALLER})
        run_id = run["run_id"]

        async def waiting():
            return (await call(client, "GET", f"/v1/runs/{run_id}"))["waiting_for"]
        await eventually(waiting, "the run to wait for its signal")
        await call(client, "POST", f"/v1/runs/{run_id}/signals/go", expect=202, json={"data": {"by": "me"}})
        await call(client, "GET", f"/v1/runs/{run_id}/wait?timeout=10")
        spans = await receiver.await_for(lambda s: any(x["name"] == "run gate" for x in s), "the run span")
    request = [s for s in spans if s["kind"] == "server" and s["trace_id"] == CALLER_TRACE
               and s["parent_id"] == CALLER_SPAN and "/runs" in s["name"] + str(s["attributes"])]
    assert request, "the API request's span continues the caller's trace"
    mine = [s for s in spans if s["attributes"].get("baton.run.id") == run_id]
    assert {s["trace_id"] for s in mine} == {CALLER_TRACE}
    (root,) = [s for s in mine if s["name"] == "run gate"]
    assert root["parent_id"] in {r["span_id"] for r in request}  # the run is a child of the request that started it
    (wait,) = [s for s in mine if s["name"] == "signal go"]
    assert wait["parent_id"] == root["span_id"] and wait["events"][-1]["name"] == "signal received"
    assert [s["name"] for s in sorted(mine, key=lambda s: s["start"]) if s["name"].startswith("step")] == ["step first", "step last"]


async def call_out(tmp_path, **overrides: Any) -> tuple[dict[str, Any], list[str | None]]:
    """Run a workflow whose step calls a loopback server, started with the caller's
    `traceparent`; the run, and the `traceparent` headers the server saw."""
    seen: list[str | None] = []

    async def hello(request: web.Request) -> web.Response:
        seen.append(request.headers.get("traceparent"))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/hello", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    workflow = f"name: call\nsteps:\n  - {{id: fetch, task: http.request, input: {{url: 'http://127.0.0.1:{port}/hello'}}}}\n"
    try:
        async with api_client(make_settings(tmp_path, {"call": workflow}, **overrides)) as client:
            run = await call(client, "POST", "/v1/workflows/call/runs", expect=201, json={"input": {}},
                             headers={"traceparent": CALLER})
            done = await call(client, "GET", f"/v1/runs/{run['run_id']}/wait?timeout=10")
            assert done["status"] == "succeeded"
    finally:
        await runner.cleanup()
    return run, seen


async def test_a_handlers_outgoing_http_request_carries_the_step_span(tmp_path, receiver, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run, seen = await call_out(tmp_path)
    task_id = f"{run['run_id']}:fetch:1"
    assert seen == [f"00-{CALLER_TRACE}-{task_span_id(task_id)}-01"]


async def test_a_nats_event_with_a_traceparent_starts_a_run_in_that_trace(tmp_path, receiver, monkeypatch, nats_server):
    monkeypatch.chdir(tmp_path)
    wf = "name: on-order\ntriggers:\n  - event: {subject: orders.created}\nsteps:\n  - {id: a, task: noop}\n"
    settings = make_settings(tmp_path, {"on-order": wf}, nats_url=nats_server.url, nats={"enabled": True})
    async with api_client(settings):
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            await js.publish("orders.created", b'{"specversion": "1.0", "id": "o-1", "source": "shop", "type": "order", "data": {}}',
                             headers={"traceparent": CALLER, "Nats-Msg-Id": "o-1"})
        finally:
            await nc.close()
        spans = await receiver.await_for(lambda s: any(x["name"] == "run on-order" for x in s), "the run span")
    (root,) = [s for s in spans if s["name"] == "run on-order"]
    assert root["trace_id"] == CALLER_TRACE and root["parent_id"] == CALLER_SPAN
    steps = [s for s in spans if s["name"] == "step a"]
    assert steps and steps[0]["trace_id"] == CALLER_TRACE and steps[0]["parent_id"] == root["span_id"]


async def test_tracing_off_exports_nothing_and_sends_no_traceparent(tmp_path, receiver, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, seen = await call_out(tmp_path, tracing={"enabled": False})
    assert seen == [None]
    # the runtime has stopped: a provider would have flushed every span by now
    assert receiver.snapshot() == [] and receiver.requests == 0


@pytest.mark.integration
def test_a_run_killed_and_resumed_stays_one_trace(tmp_path):
    receiver = OtlpReceiver().start()
    wf = tmp_path / "wf"
    wf.mkdir()
    (wf / "gate.yaml").write_text(GATE)
    server = ServerProcess(tmp_path / "data", wf, BATON_NATS__ENABLED="false",
                           OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="50")
    try:
        server.start()
        status, run = server.request("POST", "/v1/workflows/gate/runs", {"input": {}})
        assert status == 201, run
        run_id = run["run_id"]
        server.wait_for(lambda: server.request("GET", f"/v1/runs/{run_id}")[1]["waiting_for"] == ["go"], "the signal wait")
        receiver.wait_for(lambda s: any(x["name"] == "step first" for x in s), "the first step's span, from the first process")
        first_pids = {s["resource"]["service.instance.id"] for s in receiver.run_spans(run_id)}

        server.kill()
        server.start()
        status, body = server.request("POST", f"/v1/runs/{run_id}/signals/go", {"data": {}})
        assert status == 202, body
        status, done = server.request("GET", f"/v1/runs/{run_id}/wait?timeout=15", timeout_s=20)
        assert done["status"] == "succeeded", done
        spans = receiver.wait_for(lambda s: any(x["name"] == "run gate" for x in s), "the run span, from the second process")
    finally:
        server.stop()
        receiver.stop()
    mine = [s for s in spans if s["attributes"].get("baton.run.id") == run_id]
    assert sorted(s["name"] for s in mine) == ["run gate", "signal go", "step first", "step last"]
    assert len({s["trace_id"] for s in mine}) == 1  # one trace, across the kill
    (root,) = [s for s in mine if s["name"] == "run gate"]
    assert {s["parent_id"] for s in mine if s is not root} == {root["span_id"]}
    second_pids = {s["resource"]["service.instance.id"] for s in mine if s["name"] != "step first"}
    assert first_pids.isdisjoint(second_pids)  # really exported by two processes
    (wait,) = [s for s in mine if s["name"] == "signal go"]
    assert wait["start"] < root["end"] and wait["end"] - wait["start"] > 0


@pytest.mark.parametrize("setting, environ, on", [
    (None, {}, False),  # nowhere to send spans: off
    (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
    (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    (True, {}, True),
    (False, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, False),
    (True, {"OTEL_SDK_DISABLED": "true"}, False),  # the standard switch wins
    (True, {"OTEL_TRACES_EXPORTER": "none"}, False),
])
def test_tracing_is_on_when_there_is_somewhere_to_send_spans(setting, environ, on):
    assert tracing_enabled(setting, environ) is on


def test_the_exporter_follows_otel_exporter_otlp_protocol():
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

    assert isinstance(make_exporter({}), Http)
    assert isinstance(make_exporter({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}), Grpc)
    assert isinstance(make_exporter({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}), Http)
    with pytest.raises(ValueError, match="http/json.*not supported"):
        make_exporter({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_probes_scrapes_and_long_polls_get_no_request_span_unless_asked():
    from server.telemetry.http import excluded_routes

    assert excluded_routes({}) == {"/healthz", "/readyz", "/metrics", "/v1/runs/{run_id}/wait"}
    assert excluded_routes({"OTEL_PYTHON_EXCLUDED_URLS": "/healthz, /metrics"}) == {"/healthz", "/metrics"}
    assert excluded_routes({"OTEL_PYTHON_EXCLUDED_URLS": ""}) == frozenset()  # trace every request


def test_error_texts_on_spans_are_masked_like_log_lines():
    from opentelemetry.proto.trace.v1.trace_pb2 import Span

    from server.telemetry.trace import SpanRecord
    from server.telemetry.tracing import encode_record

    record = SpanRecord("a" * 16, None, "step pay", 1.0, 2.0, status="error", message="HttpError: password=hunter22",
                        events=[("exception", 2.0, {"exception.message": "Bearer abcdefghijkl refused"})])
    span = Span.FromString(encode_record(bytes.fromhex("b" * 32), record))
    assert span.status.message == "HttpError: password=[redacted]"
    assert span.events[0].attributes[0].value.string_value == "Bearer [redacted] refused"
