"""A run's spans from Baton's own records: `GET /v1/runs/{id}/trace`, `baton trace` and the
trace id of `baton show`. No tracing back end is involved: the spans are rebuilt from the
run's history (server/telemetry/trace.py), open ones included."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from server.api.views import RunDetail, RunTraceView
from server.cli import _span_time, app
from server.client import BatonClient
from server.settings import Settings
from server.telemetry.ids import run_span_id, run_trace_id, task_span_id
from tests.inproc import api_client, call, eventually
from tests.serverproc import ServerProcess

SERVER_START_S = 30.0  # a cold start imports the world; generous, but bounded
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = f"00-{CALLER_TRACE}-00f067aa0ba902b7-01"

# A step that fails once and is retried, then a wait for a signal, then a fan-out.
FLAKY_GATE = """
name: flaky-gate
steps:
  - id: flaky
    task: fail
    input: {message: not yet, times: 1}
    retry: {max_attempts: 3, initial_delay: 10ms}
  - id: gate
    wait_for_signal: {signal: go}
  - id: checks
    parallel:
      left: [{id: ping, task: noop}]
      right: [{id: pong, task: noop}]
"""

runner = CliRunner()


def baton(*args: str, **kwargs):
    return runner.invoke(app, list(args), **kwargs)


def by_name(spans: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for s in spans:
        out.setdefault(s["name"], []).append(s)
    return out


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no repository config/baton.yaml
    for name in ("BATON_CONFIG", "BATON_URL", "BATON_JAEGER_URL", "BATON_WORKFLOWS", "BATON_HANDLER_MODULES"):
        monkeypatch.delenv(name, raising=False)


# --- the API, in-process ------------------------------------------------------------------


def make_settings(tmp_path) -> Settings:
    wf = tmp_path / "wf"
    wf.mkdir(exist_ok=True)
    (wf / "flaky-gate.yaml").write_text(FLAKY_GATE)
    return Settings(data_dir=tmp_path / "data", workflows=[wf], handler_modules=[], auth={"enabled": False},
                    nats={"enabled": False}, limits={"shutdown_grace_s": 0.5})


async def test_the_trace_of_a_waiting_run_has_open_spans_that_close_when_it_goes_on(tmp_path):
    async with api_client(make_settings(tmp_path)) as client:
        run_id = (await call(client, "POST", "/v1/workflows/flaky-gate/runs", expect=201, json={}))["run_id"]

        async def waiting():
            return "go" in (await call(client, "GET", f"/v1/runs/{run_id}"))["waiting_for"]
        await eventually(waiting, "the run to wait for its signal")

        detail = RunDetail.model_validate(await call(client, "GET", f"/v1/runs/{run_id}")).model_dump()
        before = RunTraceView.model_validate(await call(client, "GET", f"/v1/runs/{run_id}/trace")).model_dump()
        assert before["run_id"] == run_id
        assert before["trace_id"] == detail["trace_id"] == run_trace_id(run_id)  # no caller trace: from the run id
        names = by_name(before["spans"])
        (root,) = names["run flaky-gate"]
        assert root["span_id"] == run_span_id(run_id, 1) and root["parent_id"] is None
        assert root["end"] is None and root["duration_s"] is None and root["status"] == "unset"
        # the retried step: one span per attempt, under the run; the failed one says why and when it retries
        first, second = sorted(names["step flaky"], key=lambda s: s["attributes"]["baton.step.attempt"])
        assert [first["span_id"], second["span_id"]] == [task_span_id(f"{run_id}:flaky:{n}") for n in (1, 2)]
        assert {first["parent_id"], second["parent_id"]} == {root["span_id"]}
        assert first["status"] == "error" and "not yet" in first["message"]
        assert first["attributes"]["baton.outcome"] == "failed"
        (retry,) = [e for e in first["events"] if e["name"] == "retry scheduled"]
        assert retry["attributes"]["baton.retry.delay_s"] > 0
        assert second["status"] == "ok" and second["end"] is not None and second["duration_s"] >= 0
        # the wait: open, with no end, while the run waits
        (wait,) = names["signal go"]
        assert wait["parent_id"] == root["span_id"] and wait["end"] is None and wait["status"] == "unset"
        assert wait["attributes"]["baton.signal"] == "go"
        assert "step ping" not in names

        await call(client, "POST", f"/v1/runs/{run_id}/signals/go", expect=202, json={"data": {"by": "ada"}})
        assert (await call(client, "GET", f"/v1/runs/{run_id}/wait?timeout=10"))["status"] == "succeeded"
        after = RunTraceView.model_validate(await call(client, "GET", f"/v1/runs/{run_id}/trace")).model_dump()

    assert after["trace_id"] == before["trace_id"]
    spans = {s["span_id"]: s for s in after["spans"]}
    assert all(s["end"] is not None for s in spans.values())
    # the same spans, now closed: ids do not change when a span ends
    closed_wait = spans[wait["span_id"]]
    assert closed_wait["status"] == "ok" and closed_wait["start"] == wait["start"]
    assert [e["name"] for e in closed_wait["events"]] == ["signal received"]
    assert closed_wait["events"][0]["attributes"]["baton.signal.by"] == "anonymous"  # the caller (auth is off)
    closed_root = spans[root["span_id"]]
    assert closed_root["status"] == "ok" and closed_root["attributes"]["baton.outcome"] == "succeeded"
    names = by_name(after["spans"])
    (checks,) = names["step checks"]
    assert checks["parent_id"] == root["span_id"]
    assert {s["parent_id"] for s in names["step ping"] + names["step pong"]} == {checks["span_id"]}


async def test_a_run_started_with_a_traceparent_is_in_the_callers_trace(tmp_path):
    async with api_client(make_settings(tmp_path)) as client:
        run = await call(client, "POST", "/v1/workflows/flaky-gate/runs", expect=201, json={},
                         headers={"traceparent": CALLER})
        trace = await call(client, "GET", f"/v1/runs/{run['run_id']}/trace")
        detail = await call(client, "GET", f"/v1/runs/{run['run_id']}")
        await call(client, "GET", "/v1/runs/nope/trace", expect=404)
    assert trace["trace_id"] == detail["trace_id"] == CALLER_TRACE
    (root,) = [s for s in trace["spans"] if s["name"] == "run flaky-gate"]
    assert root["parent_id"] == "00f067aa0ba902b7"  # the caller's span: the run is its child


@pytest.mark.parametrize(("seconds", "shown"), [
    (0.0, "0.000s"), (0.0124, "0.012s"), (59.9991, "59.999s"), (60, "1m00s"), (125.5, "2m05s"),
    (3 * 3600 + 120, "3h02m"), (3 * 86400 + 4 * 3600 + 59, "3d04h"),
])
def test_span_times_read_at_a_glance(seconds, shown):
    assert _span_time(seconds) == shown


# --- the CLI against a real server ----------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    wf = root / "wf"
    wf.mkdir()
    (wf / "flaky-gate.yaml").write_text(FLAKY_GATE)
    proc = ServerProcess(root / "data", wf)
    proc.start(timeout_s=SERVER_START_S)
    try:
        yield proc.url
    finally:
        proc.stop()


def start_waiting(server: str) -> str:
    """A flaky-gate run, once it waits for its signal."""
    client = BatonClient(server)
    run_id = client.start("flaky-gate", {})[0]["run_id"]
    for _ in range(200):  # bounded: each round is a long poll that returns early when the run ends
        if "go" in client.run(run_id)["waiting_for"]:
            return run_id
        client.wait(run_id, 0.05)
    raise AssertionError(f"run {run_id} never waited for go")


def indent(line: str) -> int:
    """Where the span's name starts: rich draws the tree guides before it."""
    return len(line) - len(line.lstrip(" │├└─"))


@pytest.mark.integration
def test_baton_trace_draws_the_live_tree_then_the_finished_one(server):
    run_id = start_waiting(server)
    result = baton("trace", run_id, "--url", server)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"trace {run_trace_id(run_id)}  run {run_id}"
    (run_line,) = [line for line in lines if "run flaky-gate" in line]
    assert re.search(r"run flaky-gate  unset  \+0\.000s  running  attempt 1$", run_line), run_line
    flaky = [line for line in lines if "step flaky" in line]
    assert len(flaky) == 2
    assert re.search(r"step flaky  error  \+\d+\.\d{3}s  \d+\.\d{3}s  attempt 1  HandlerFailed: not yet$", flaky[0]), flaky
    assert re.search(r"step flaky  ok  \+\d+\.\d{3}s  \d+\.\d{3}s  attempt 2$", flaky[1]), flaky
    (retry,) = [line for line in lines if "retry scheduled" in line]
    assert re.search(r"• retry scheduled  \+\d+\.\d{3}s  in 0\.0\d\ds$", retry), retry
    (wait,) = [line for line in lines if "signal go" in line]
    assert re.search(r"signal go  unset  \+\d+\.\d{3}s  running$", wait), wait
    # the tree: steps under the run, the retry event under the failed attempt
    assert indent(flaky[0]) == indent(wait) > indent(run_line)
    assert indent(retry) > indent(flaky[0]) and lines.index(retry) == lines.index(flaky[0]) + 1

    BatonClient(server).signal(run_id, "go", {"by": "ada"})
    assert BatonClient(server).wait(run_id, 10)["status"] == "succeeded"
    done = baton("trace", run_id, "--url", server)
    assert done.exit_code == 0, done.output
    assert "running" not in done.stdout
    lines = done.stdout.splitlines()
    assert re.search(r"run flaky-gate  ok  \+0\.000s  \d+\.\d{3}s  attempt 1$", lines[1]), lines
    (received,) = [line for line in lines if "signal received" in line]
    assert received.rstrip().endswith("by anonymous")
    (checks,) = [line for line in lines if "step checks" in line]
    ping = next(line for line in lines if "step ping" in line)
    assert indent(ping) > indent(checks) > indent(lines[1])  # the fan-out nests under its parallel step

    as_json = baton("trace", run_id, "--json", "--url", server)
    answer = orjson.loads(as_json.stdout)
    RunTraceView.model_validate(answer)
    assert answer["run_id"] == run_id and len(answer["spans"]) == len(lines) - 1 - 2  # minus the title and 2 events


@pytest.mark.integration
def test_baton_trace_of_an_unknown_run_says_so(server):
    result = baton("trace", "nope", "--url", server)
    assert result.exit_code == 1 and "unknown run 'nope'" in result.stderr


@pytest.mark.integration
def test_baton_show_prints_the_trace_id_and_the_jaeger_link_when_configured(server):
    run_id = start_waiting(server)
    trace_id = run_trace_id(run_id)
    plain = baton("show", run_id, "--url", server)
    assert plain.exit_code == 0, plain.output
    assert re.search(rf"^trace\s+{trace_id}$", plain.stdout, re.M)
    assert "jaeger" not in plain.stdout

    linked = baton("show", run_id, "--url", server, env={"BATON_JAEGER_URL": "http://localhost:16686/"})
    assert linked.exit_code == 0, linked.output
    assert re.search(rf"^jaeger\s+http://localhost:16686/trace/{trace_id}$", linked.stdout, re.M)

    bad = baton("show", run_id, "--url", server, env={"BATON_JAEGER_URL": "localhost:16686"})
    assert bad.exit_code == 2 and "jaeger_url" in bad.stderr
    BatonClient(server).cancel(run_id)
