"""Review of the observability slice: regressions for what the review found.

* Telemetry after a commit (metrics, span queueing) failing must not stop the dispatch
  of what the commit decided: the run still ends.
* Shutdown with an unreachable collector returns after the flush budget, not after the
  batch processor's 30 s.
* A finished run leaves nothing behind in the span task's memory.
* `tracing.trigger: link`: the sampler sees the run's own trace as a root, and the run's
  detail names the trace its spans are in.
* An API request span never carries an approval link's credential.
"""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from server.telemetry.trace import RunTrace
from server.telemetry import tracing
from server.telemetry.tracing import RunSpans, make_exporter, make_provider
from tests.inproc import api_client, call, runtime_of
from tests.otlp import OtlpReceiver
from tests.test_tracing import CALLER, CALLER_TRACE, GATE, make_settings

CHAIN = "name: chain\nsteps:\n  - {id: a, task: noop}\n  - {id: b, task: noop}\n"


@pytest.fixture
def receiver(monkeypatch):
    r = OtlpReceiver().start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", r.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    yield r
    r.stop()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("broken", ["metrics", "spans"])
async def test_a_telemetry_failure_after_the_commit_does_not_stall_the_run(tmp_path, receiver, monkeypatch, broken):
    monkeypatch.chdir(tmp_path)
    async with api_client(make_settings(tmp_path, {"chain": CHAIN})) as client:
        runtime = runtime_of(client)

        def boom(*_: object) -> None:
            raise RuntimeError("telemetry bug")

        if broken == "metrics":
            monkeypatch.setattr(runtime.metrics, "committed", boom)
        else:
            monkeypatch.setattr(runtime.run_spans, "committed", boom)
        run = await call(client, "POST", "/v1/workflows/chain/runs", expect=201, json={"input": {}})
        done = await call(client, "GET", f"/v1/runs/{run['run_id']}/wait?timeout=10")
        assert done["status"] == "succeeded"  # both steps dispatched although telemetry failed


async def test_stop_does_not_wait_for_an_unreachable_collector(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    provider, processor = make_provider(make_exporter())
    spans = RunSpans(provider, processor, store=None, graphs=None)
    await spans.start()
    tracer = provider.get_tracer("review")
    for _ in range(2000):  # several batches: each export retries for its own timeout
        tracer.start_span("s").end()
    # the batch processor alone would wait up to 30 s for them
    monkeypatch.setattr(tracing, "FLUSH_TIMEOUT_S", 0.1, raising=False)
    await asyncio.wait_for(spans.stop(), 20)
    assert any(t.name == "baton-span-flush" and t.is_alive() for t in threading.enumerate()), \
        "stop waited for the whole export instead of its flush budget"


async def test_a_finished_run_leaves_no_sampling_decision_behind(tmp_path, receiver, monkeypatch):
    monkeypatch.chdir(tmp_path)
    async with api_client(make_settings(tmp_path, {"chain": CHAIN})) as client:
        runtime = runtime_of(client)
        run = await call(client, "POST", "/v1/workflows/chain/runs", expect=201, json={"input": {}})
        await call(client, "GET", f"/v1/runs/{run['run_id']}/wait?timeout=10")
        await receiver.await_for(lambda s: any(x["name"] == "run chain" for x in s), "the run span")
        assert run["run_id"] not in runtime.run_spans._traces
        assert run["run_id"] not in runtime.run_spans._sampled  # one entry per finished run otherwise, forever


async def test_a_linked_trigger_does_not_decide_the_runs_sampling(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    provider, processor = make_provider(make_exporter())
    try:
        linked = RunSpans(provider, processor, store=None, graphs=None, link_trigger=True)
        trace = RunTrace("r-1", None, workflow="w", version="1", event={"traceparent": CALLER}, link_trigger=True)
        assert trace.trace_id != CALLER_TRACE
        assert linked._is_sampled(trace) is False  # a root of its own: the ratio (0) decides, not the caller
        child = RunTrace("r-2", None, workflow="w", version="1", event={"traceparent": CALLER})
        assert RunSpans(provider, processor, store=None, graphs=None)._is_sampled(child) is True  # parent sampled
    finally:
        provider.shutdown()


async def test_in_link_mode_the_run_detail_names_the_trace_of_its_spans(tmp_path, receiver, monkeypatch):
    monkeypatch.chdir(tmp_path)
    async with api_client(make_settings(tmp_path, {"gate": GATE}, tracing={"enabled": True, "trigger": "link"})) as client:
        run = await call(client, "POST", "/v1/workflows/gate/runs", expect=201, json={"input": {}},
                         headers={"traceparent": CALLER})
        detail = await call(client, "GET", f"/v1/runs/{run['run_id']}")
        trace = await runtime_of(client).trace(run["run_id"])
    assert detail["trace_id"] == trace["trace_id"] != CALLER_TRACE


async def test_a_request_span_masks_an_approval_links_credential(tmp_path, receiver, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OTEL_PYTHON_EXCLUDED_URLS", "")
    secret = "v1.c2VjcmV0LXRva2VuLXZhbHVl.abcdef0123456789"
    async with api_client(make_settings(tmp_path, {"gate": GATE})) as client:
        response = await client.get(f"/v1/approvals/{secret}")
        assert response.status >= 400
        spans = await receiver.await_for(
            lambda s: any(x["attributes"].get("http.route") == "/v1/approvals/{token}" for x in s), "the request span")
    (span,) = [s for s in spans if s["attributes"].get("http.route") == "/v1/approvals/{token}"]
    assert secret not in repr(span)
    assert span["attributes"]["url.path"] == "/v1/approvals/[redacted]"
