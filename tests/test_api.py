"""The HTTP API against the real runtime (SQLite in tmp_path, built-in handlers)."""

from __future__ import annotations

import csv
import io
import time
from datetime import datetime, timezone

import orjson
import pytest

import server.errors as errors_module
from server.api.errors import STATUS, status_for
from server.api.schemas import StartRun, dotted, parse_body
from server.errors import BadRequest, BatonError, InvalidInput
from server.settings import Settings
from tests.inproc import api_client, call
from tests.sample_workflows import APPROVAL, GREET

MAX_BODY_BYTES = 4096



@pytest.fixture
async def api(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # keep the repository's config/baton.yaml out of it
    wf = tmp_path / "wf"
    wf.mkdir()
    (wf / "greet.yaml").write_text(GREET)
    (wf / "approval.yaml").write_text(APPROVAL)
    settings = Settings(
        data_dir=tmp_path / "data", workflows=[wf], handler_modules=[], limits={"max_body_bytes": MAX_BODY_BYTES},
        auth={"enabled": False},
    )
    async with api_client(settings) as client:
        yield client


async def start(client, workflow="greet", input={"name": "ada"}, expect=201, **extra) -> dict:  # noqa: B006
    return await call(client, "POST", f"/v1/workflows/{workflow}/runs", expect, json={"input": input, **extra})


async def wait(client, run_id: str) -> dict:
    return await call(client, "GET", f"/v1/runs/{run_id}/wait?timeout=10", 200)


async def wait_for_signal(client, run_id: str, name: str) -> None:
    """Until the run's gate is open (bounded: the run is a few in-process echoes away)."""
    for _ in range(200):
        run = await call(client, "GET", f"/v1/runs/{run_id}", 200)
        if name in run["waiting_for"]:
            return
        await wait_briefly(client, run_id)
    raise AssertionError(f"run {run_id} never waited for {name!r}")


async def wait_briefly(client, run_id: str) -> None:
    await call(client, "GET", f"/v1/runs/{run_id}/wait?timeout=0.02", 200)


async def snapshot(client, run_id: str) -> tuple[dict, dict, dict]:
    runs = await call(client, "GET", "/v1/runs?limit=500", 200)
    run = await call(client, "GET", f"/v1/runs/{run_id}", 200)
    events = await call(client, "GET", f"/v1/runs/{run_id}/history", 200)
    return runs, run, events


def assert_error(body: dict, code: str, field: str | None = None) -> None:
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    assert body["error"].get("field") == field, body


# --- starting runs ------------------------------------------------------------------


async def test_start_wait_succeeds_with_outputs(api):
    run = await start(api)
    assert run["workflow"] == "greet" and run["version"] == "2"
    done = await wait(api, run["run_id"])
    assert done["status"] == "succeeded"
    detail = await call(api, "GET", f"/v1/runs/{run['run_id']}", 200)
    assert [s["key"] for s in detail["steps"]] == ["hello", "shout"]
    assert detail["steps"][0]["output"] == {"greeting": "hello ada"}
    assert detail["steps"][1]["output"] == {"loud": "HELLO ADA"}
    assert all(s["status"] == "succeeded" and s["kind"] == "task" for s in detail["steps"])


async def test_same_open_workflow_id_returns_the_existing_run(api):
    first = await start(api, "approval", None, workflow_id="order-7")
    again = await start(api, "approval", None, expect=200, workflow_id="order-7")
    assert again["run_id"] == first["run_id"]
    runs = await call(api, "GET", "/v1/runs?workflow_id=order-7", 200)
    assert [r["run_id"] for r in runs["runs"]] == [first["run_id"]]


async def test_start_unknown_workflow_is_404(api):
    assert_error(await start(api, "nope", expect=404), "workflow_not_found", "workflow")


async def test_start_input_violating_the_schema_is_422_naming_the_field(api):
    body = await start(api, input={"name": 42}, expect=422)
    assert_error(body, "invalid_input", "input.name")
    body = await start(api, input={}, expect=422)
    assert_error(body, "invalid_input", "input.name")  # a missing property is named, not just its parent
    assert "required" in body["error"]["message"]


async def test_request_body_with_an_unknown_field_is_422_naming_it(api):
    body = await call(api, "POST", "/v1/workflows/greet/runs", 422, json={"input": {"name": "a"}, "workflowid": "x"})
    assert_error(body, "invalid_input", "workflowid")
    body = await call(api, "POST", "/v1/workflows/greet/runs", 422, json={"input": {"name": "a"}, "workflow_id": 7})
    assert_error(body, "invalid_input", "workflow_id")


async def test_malformed_json_is_400_naming_the_position(api):
    body = await call(api, "POST", "/v1/workflows/greet/runs", 400, data=b'{"input": {"name": "a"',
                      headers={"Content-Type": "application/json"})
    assert_error(body, "bad_json")
    assert "line 1 column" in body["error"]["message"]


async def test_oversized_body_is_413(api):
    big = orjson.dumps({"input": {"name": "x" * MAX_BODY_BYTES}})
    body = await call(api, "POST", "/v1/workflows/greet/runs", 413, data=big)
    assert_error(body, "payload_too_large")


async def test_oversized_chunked_body_is_413(api):
    async def chunks():  # no Content-Length: aiohttp's client_max_size has to catch it
        yield b'{"input": {"name": "'
        yield b"x" * MAX_BODY_BYTES
        yield b'"}}'

    body = await call(api, "POST", "/v1/workflows/greet/runs", 413, data=chunks())
    assert_error(body, "payload_too_large")


# --- reading runs ---------------------------------------------------------------------


async def test_unknown_run_is_404_everywhere(api):
    for method, path in [
        ("GET", "/v1/runs/nope"), ("GET", "/v1/runs/nope/history"), ("GET", "/v1/runs/nope/wait?timeout=0"),
        ("POST", "/v1/runs/nope/signals/approve"), ("POST", "/v1/runs/nope/cancel"), ("POST", "/v1/runs/nope/retry"),
    ]:
        assert_error(await call(api, method, path, 404), "run_not_found", "run_id")


async def test_list_filters_and_cursor_pagination(api):
    greeted = [await start(api, input={"name": n}) for n in ("a", "b", "c")]
    for run in greeted:
        await wait(api, run["run_id"])
    gate = await start(api, "approval", None)

    seen, cursor = [], None
    for _ in range(3):
        page = await call(api, "GET", "/v1/runs?workflow=greet&limit=2" + (f"&cursor={cursor}" if cursor else ""), 200)
        seen += [r["run_id"] for r in page["runs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(r["run_id"] for r in greeted) and len(seen) == 3

    succeeded = await call(api, "GET", "/v1/runs?status=succeeded", 200)
    assert {r["run_id"] for r in succeeded["runs"]} == {r["run_id"] for r in greeted}
    approval = await call(api, "GET", "/v1/runs?workflow=approval", 200)
    assert [r["run_id"] for r in approval["runs"]] == [gate["run_id"]]

    past = datetime(2020, 1, 1, tzinfo=timezone.utc).isoformat().replace("+00:00", "Z")
    assert len((await call(api, "GET", f"/v1/runs?since={past}", 200))["runs"]) == 4
    future = int(time.time()) + 3600
    assert (await call(api, "GET", f"/v1/runs?since={future}", 200))["runs"] == []
    assert len((await call(api, "GET", f"/v1/runs?until={future}", 200))["runs"]) == 4


@pytest.mark.parametrize("query, field", [
    ("since=yesterday", "since"), ("until=2024-13-01", "until"), ("limit=0", "limit"), ("limit=501", "limit"),
    ("limit=ten", "limit"), ("status=sleeping", "status"), ("cursor=!!", "cursor"), ("since=nan", "since"),
])
async def test_list_with_a_bad_parameter_is_400_naming_it(api, query, field):
    assert_error(await call(api, "GET", f"/v1/runs?{query}", 400), "bad_request", field)


async def test_history_as_json_and_csv(api):
    run = await start(api)
    await wait(api, run["run_id"])
    events = (await call(api, "GET", f"/v1/runs/{run['run_id']}/history", 200))["events"]
    assert events[0]["seq"] == 1 and [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    types = [e["type"] for e in events]
    assert types[0] == "run.started" and types[-1] == "run.succeeded", types

    for kwargs in ({"params": {"format": "csv"}}, {"headers": {"Accept": "text/csv"}}):
        response = await api.get(f"/v1/runs/{run['run_id']}/history", **kwargs)
        assert response.status == 200 and response.content_type == "text/csv"
        rows = list(csv.DictReader(io.StringIO(await response.text())))
        assert [r["type"] for r in rows] == types
        assert [int(r["seq"]) for r in rows] == [e["seq"] for e in events]
        assert [orjson.loads(r["data"]) for r in rows] == [e["data"] for e in events]
        assert [r["key"] for r in rows] == [e["key"] or "" for e in events]

    page = await call(api, "GET", f"/v1/runs/{run['run_id']}/history?after=2&limit=2", 200)
    assert [e["seq"] for e in page["events"]] == [3, 4]
    assert_error(await call(api, "GET", f"/v1/runs/{run['run_id']}/history?format=xml", 400), "bad_request", "format")


async def test_workflows(api):
    listed = (await call(api, "GET", "/v1/workflows", 200))["workflows"]
    assert sorted(w["name"] for w in listed) == ["approval", "greet"]
    greet = await call(api, "GET", "/v1/workflows/greet", 200)
    assert greet["steps"] == ["hello", "shout"] and greet["version"] == "2"
    assert greet["input_schema"]["required"] == ["name"]
    assert_error(await call(api, "GET", "/v1/workflows/nope", 404), "workflow_not_found", "name")


# --- signals, cancel, retry -----------------------------------------------------------


async def test_signal_resumes_a_waiting_run(api):
    run = await start(api, "approval", None)
    await wait_for_signal(api, run["run_id"], "approve")
    ack = await call(api, "POST", f"/v1/runs/{run['run_id']}/signals/approve", 202, json={"data": {"by": "alice"}})
    assert ack == {"run_id": run["run_id"], "signal": "approve", "delivered": True}
    assert (await wait(api, run["run_id"]))["status"] == "succeeded"
    detail = await call(api, "GET", f"/v1/runs/{run['run_id']}", 200)
    assert detail["steps"][-1]["output"] == {"approved": {"by": "alice"}}


async def test_signal_to_a_finished_run_is_409(api):
    run = await start(api)
    await wait(api, run["run_id"])
    body = await call(api, "POST", f"/v1/runs/{run['run_id']}/signals/approve", 409)
    assert_error(body, "conflict")


async def test_signal_nobody_waits_for_is_409(api):
    run = await start(api, "approval", None)
    await wait_for_signal(api, run["run_id"], "approve")
    body = await call(api, "POST", f"/v1/runs/{run['run_id']}/signals/reject", 409, json={})
    assert_error(body, "conflict", "name")
    assert "approve" in body["error"]["message"]


async def test_cancel_a_waiting_run_then_retry_it(api):
    run = await start(api, "approval", None)
    await wait_for_signal(api, run["run_id"], "approve")
    cancelled = await call(api, "POST", f"/v1/runs/{run['run_id']}/cancel", 202, json={"reason": "changed my mind"})
    assert cancelled["run_id"] == run["run_id"]
    assert (await wait(api, run["run_id"]))["status"] == "cancelled"
    retried = await call(api, "POST", f"/v1/runs/{run['run_id']}/retry", 202)
    assert retried["attempt"] == 2


async def test_cancel_a_finished_run_is_409(api):
    run = await start(api)
    await wait(api, run["run_id"])
    assert_error(await call(api, "POST", f"/v1/runs/{run['run_id']}/cancel", 409), "conflict")


async def test_retry_a_running_run_is_409(api):
    run = await start(api, "approval", None)
    await wait_for_signal(api, run["run_id"], "approve")
    assert_error(await call(api, "POST", f"/v1/runs/{run['run_id']}/retry", 409), "conflict")


async def test_wait_returns_the_run_as_it_is_after_the_timeout(api):
    run = await start(api, "approval", None)
    waited = await call(api, "GET", f"/v1/runs/{run['run_id']}/wait?timeout=0.05", 200)
    assert waited["run_id"] == run["run_id"] and waited["status"] not in ("succeeded", "failed")
    assert_error(await call(api, "GET", f"/v1/runs/{run['run_id']}/wait?timeout=-1", 400), "bad_request", "timeout")


async def test_rejected_requests_change_nothing_stored(api):
    done = await start(api)
    await wait(api, done["run_id"])
    gate = await start(api, "approval", None, workflow_id="w-1")
    await wait_for_signal(api, gate["run_id"], "approve")
    before = [await snapshot(api, done["run_id"]), await snapshot(api, gate["run_id"])]

    rejected = [
        ("POST", "/v1/workflows/greet/runs", {"json": {"input": {"name": 1}}}, 422),
        ("POST", "/v1/workflows/greet/runs", {"json": {"input": {"name": "a"}, "extra": 1}}, 422),
        ("POST", "/v1/workflows/greet/runs", {"data": b"{nope"}, 400),
        ("POST", "/v1/workflows/greet/runs", {"data": b"{" + b" " * MAX_BODY_BYTES + b"}"}, 413),
        ("POST", "/v1/workflows/nope/runs", {"json": {"input": None}}, 404),
        ("POST", f"/v1/runs/{done['run_id']}/signals/approve", {}, 409),
        ("POST", f"/v1/runs/{done['run_id']}/cancel", {"json": {"reason": "late"}}, 409),
        ("POST", f"/v1/runs/{gate['run_id']}/signals/reject", {"json": {"data": 1}}, 409),
        ("POST", f"/v1/runs/{gate['run_id']}/signals/approve", {"data": b"[1,"}, 400),
        ("POST", f"/v1/runs/{gate['run_id']}/cancel", {"json": {"reason": 5}}, 422),
        ("POST", f"/v1/runs/{gate['run_id']}/retry", {}, 409),
    ]
    for method, path, kwargs, status in rejected:
        await call(api, method, path, status, **kwargs)

    assert [await snapshot(api, done["run_id"]), await snapshot(api, gate["run_id"])] == before


# --- probes, headers, error shape -----------------------------------------------------


async def test_health_and_readiness(api):
    assert await call(api, "GET", "/healthz", 200) == {"status": "ok"}
    assert (await call(api, "GET", "/readyz", 200))["status"] == "ready"


async def test_request_id_is_echoed_or_generated(api):
    response = await api.get("/healthz", headers={"X-Request-Id": "abc-123"})
    assert response.headers["X-Request-Id"] == "abc-123"
    response = await api.get("/v1/runs/nope")  # errors carry it too
    generated = response.headers["X-Request-Id"]
    assert len(generated) >= 16
    response = await api.get("/healthz", headers={"X-Request-Id": "bad id\twith junk"})
    assert response.headers["X-Request-Id"] != "bad id\twith junk"


async def test_aiohttp_errors_have_the_same_json_shape(api):
    assert_error(await call(api, "GET", "/v2/nothing", 404), "not_found")
    response = await api.delete("/v1/runs")
    assert response.status == 405 and "GET" in response.headers["Allow"]
    assert_error(await response.json(), "method_not_allowed")


def test_every_baton_error_has_a_deliberate_status():
    # A new error class must be placed in the table, or be listed here as a 500.
    deliberately_500 = {"BatonError", "DefinitionError", "ConfigError"}
    classes = [c for c in vars(errors_module).values() if isinstance(c, type) and issubclass(c, BatonError)]
    for cls in classes:
        mapped = any(base in STATUS for base in cls.__mro__)
        assert mapped or cls.__name__ in deliberately_500, f"{cls.__name__} has no HTTP status"
    assert status_for(errors_module.RunNotFound("x")) == 404
    assert status_for(errors_module.StoreError("x")) == 503
    assert status_for(errors_module.DefinitionError(["x"])) == 500


def test_parse_body_names_nested_fields():
    with pytest.raises(InvalidInput) as info:
        parse_body(StartRun, b'{"version": [1]}')
    assert info.value.field == "version"
    assert dotted(("steps", 2, "needs", 0)) == "steps[2].needs[0]"
    with pytest.raises(BadRequest):
        parse_body(StartRun, b"")
    assert parse_body(StartRun, b"{}").input is None
