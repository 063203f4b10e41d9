"""CSV / JSON Lines exports of runs and step attempts: real HTTP, the real runtime and SQLite,
a real server process for the CLI. Pages are made small so every export spans several."""

from __future__ import annotations

import asyncio
import csv
import io
import subprocess
import sys
import time
from datetime import datetime, timezone

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from server.api import errors
from server.api.export import _stream
from server.client import BatonClient, ClientError
from server.errors import StoreError
from server.runtime.clock import SystemClock, iso
from server.runtime.export import RUN_COLUMNS, STEP_COLUMNS
from server.settings import Settings
from server.store.base import Batch, RunRow
from server.store.sqlite import SQLiteStore
from tests.inproc import api_client, call
from tests.sample_workflows import APPROVAL, GREET
from tests.serverproc import REPO, ServerProcess

PAGE = 2  # runs per export page: every export below spans several

FLAKY = """\
name: flaky
steps:
  - id: once
    task: fail
    input: {times: 1}
    retry: {max_attempts: 3, initial_delay: 0.01, jitter: 0}
  - id: after
    task: echo
    input: {v: 1}
"""

SAGA = """\
name: saga
steps:
  - id: reserve
    task: echo
    input: {v: 1}
    compensate: {task: echo, input: {undo: true}}
  - id: boom
    task: fail
    input: {message: kaput, retryable: false}
"""

STUCK = """\
name: stuck
steps:
  - id: nap
    task: sleep
    input: {seconds: 30}
    timeout: 0.05
    retry: {max_attempts: 2, initial_delay: 0.01, jitter: 0}
"""

NAPPING = """\
name: napping
steps:
  - id: nap
    task: sleep
    input: {seconds: 30}
"""


class ShiftedClock(SystemClock):
    """Real time moved by `offset`: runs get creation times the test chooses, far apart."""

    offset = 0.0

    def now(self) -> float:
        return super().now() + self.offset


def write_workflows(root):
    wf = root / "wf"
    wf.mkdir()
    for name, text in (("greet", GREET), ("approval", APPROVAL), ("flaky", FLAKY), ("saga", SAGA),
                       ("stuck", STUCK), ("napping", NAPPING)):
        (wf / f"{name}.yaml").write_text(text)
    return wf


@pytest.fixture
def clock():
    return ShiftedClock()


@pytest.fixture
async def api(tmp_path, monkeypatch, clock):
    monkeypatch.chdir(tmp_path)
    settings = Settings(data_dir=tmp_path / "data", workflows=[write_workflows(tmp_path)], handler_modules=[],
                        auth={"enabled": False}, nats={"enabled": False}, audit={"export_page_size": PAGE},
                        limits={"shutdown_grace_s": 0.2})
    async with api_client(settings, clock) as client:
        yield client


async def start(client, workflow: str, input=None, **extra) -> dict:
    return await call(client, "POST", f"/v1/workflows/{workflow}/runs", 201, json={"input": input, **extra})


async def finished(client, run: dict) -> dict:
    done = await call(client, "GET", f"/v1/runs/{run['run_id']}/wait?timeout=10")
    assert done["finished_at"], done
    return done


async def export(client, what: str, query: str = "", **kwargs) -> tuple[str, object]:
    response = await client.get(f"/v1/export/{what}?{query}", **kwargs)
    text = await response.text()
    assert response.status == 200, text
    return text, response


def rows_of(text: str) -> list[dict]:
    reader = csv.DictReader(io.StringIO(text))
    rows = list(reader)
    assert tuple(reader.fieldnames or ()) in (RUN_COLUMNS, STEP_COLUMNS)
    return rows


async def test_csv_export_of_runs_parses_back_to_the_runs(api):
    greets = [await start(api, "greet", {"name": f"n{i}"}, workflow_id=f"order-{i}") for i in range(5)]
    broken = await start(api, "saga")
    waiting = await start(api, "approval")
    for run in [*greets, broken]:
        await finished(api, run)
    listed = (await call(api, "GET", "/v1/runs?limit=500"))["runs"]
    assert len(listed) == 7 > PAGE

    response = await api.get("/v1/export/runs?format=csv")
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert response.headers["Transfer-Encoding"] == "chunked"  # streamed, not built whole
    pieces = [piece async for piece in response.content.iter_chunks()]
    text = b"".join(data for data, _ in pieces).decode()
    assert sum(end for _, end in pieces) == 4  # one HTTP chunk per page of PAGE runs: written as read
    assert response.headers["Content-Disposition"] == 'attachment; filename="runs.csv"'
    assert response.headers["X-Request-Id"]
    rows = rows_of(text)
    by_id = {r["run_id"]: r for r in rows}
    assert [r["run_id"] for r in rows] == [r["run_id"] for r in reversed(listed)]  # oldest first, each once
    for run in listed:
        row = by_id[run["run_id"]]
        assert (row["workflow"], row["version"], row["status"], row["attempt"]) == (
            run["workflow"], run["version"], run["status"], str(run["attempt"]))
        assert row["workflow_id"] == (run["workflow_id"] or "")
        assert row["created_at"] == run["created_at"] and row["finished_at"] == (run["finished_at"] or "")
        assert row["started_by"] == "anonymous"
    assert by_id[waiting["run_id"]]["status"] == "running" and by_id[waiting["run_id"]]["duration_s"] == ""
    assert by_id[broken["run_id"]]["status"] == "compensated"
    assert by_id[broken["run_id"]]["error"] == "NonRetryableError: kaput"
    done = by_id[greets[0]["run_id"]]
    created, ended = (datetime.fromisoformat(done[k].replace("Z", "+00:00")) for k in ("created_at", "finished_at"))
    assert float(done["duration_s"]) == pytest.approx((ended - created).total_seconds(), abs=0.002)
    assert done["error"] == "" and done["workflow_id"] == "order-0"


async def test_filters_select_runs_created_in_the_window(api, clock):
    day = 86400.0
    base = datetime(2026, 1, 1, tzinfo=timezone.utc).timestamp()
    runs = []
    for i, workflow in enumerate(["greet", "approval", "greet", "greet", "approval"]):
        clock.offset = base + i * day - time.time()  # run i is created on January (i + 1)
        runs.append(await start(api, workflow, {"name": "x"} if workflow == "greet" else None))
    ids = [r["run_id"] for r in runs]

    async def exported(query: str) -> list[str]:
        return [r["run_id"] for r in rows_of((await export(api, "runs", query))[0])]

    assert await exported("") == ids
    assert await exported("since=2026-01-02&until=2026-01-04") == ids[1:3]  # [since, until)
    assert await exported(f"since={base + 3 * day}") == ids[3:]  # unix seconds too
    assert await exported("until=2026-01-03T00:00:00Z") == ids[:2]
    assert await exported("workflow=approval") == [ids[1], ids[4]]
    assert await exported("workflow=approval&since=2026-01-03") == [ids[4]]
    assert await exported("workflow=nope") == []
    await finished(api, runs[0])
    assert ids[0] in await exported("status=succeeded")
    assert ids[1] not in await exported("status=succeeded")
    steps = rows_of((await export(api, "steps", "workflow=approval&until=2026-01-03"))[0])
    assert {r["run_id"] for r in steps} == {ids[1]}


async def test_jsonl_lines_parse_and_accept_can_choose_it(api):
    runs = [await start(api, "greet", {"name": f"n{i}"}) for i in range(3)]
    for run in runs:
        await finished(api, run)
    text, response = await export(api, "runs", "format=jsonl")
    assert response.headers["Content-Type"] == "application/x-ndjson; charset=utf-8"
    lines = [orjson.loads(line) for line in text.splitlines()]
    assert [line["run_id"] for line in lines] == [r["run_id"] for r in runs]
    assert all(tuple(line) == RUN_COLUMNS for line in lines)
    assert lines[0]["attempt"] == 1 and isinstance(lines[0]["duration_s"], float) and lines[0]["error"] is None
    by_accept, response = await export(api, "runs", headers={"Accept": "application/x-ndjson"})
    assert by_accept == text and response.headers["Content-Disposition"].endswith('runs.jsonl"')
    by_default, _ = await export(api, "runs")
    assert by_default.startswith(",".join(RUN_COLUMNS) + "\r\n")  # csv unless asked otherwise


async def test_steps_export_has_one_row_per_attempt(api):
    flaky = await finished(api, await start(api, "flaky"))
    saga = await finished(api, await start(api, "saga"))
    stuck = await finished(api, await start(api, "stuck"))
    gate = await start(api, "approval")
    napping = await start(api, "napping")
    for _ in range(200):  # until the gate is open: its first step ran (bounded, a few echoes away)
        if (await call(api, "GET", f"/v1/runs/{gate['run_id']}"))["waiting_for"]:
            break
        await call(api, "GET", f"/v1/runs/{gate['run_id']}/wait?timeout=0.02")
    else:
        raise AssertionError(f"run {gate['run_id']} never reached its approval gate")
    await call(api, "POST", f"/v1/runs/{napping['run_id']}/cancel", 202, json={})
    await finished(api, napping)
    assert flaky["status"] == "succeeded" and stuck["status"] == "failed"

    rows = rows_of((await export(api, "steps"))[0])
    assert [r["run_id"] for r in rows] == sorted((r["run_id"] for r in rows), key=[
        flaky["run_id"], saga["run_id"], stuck["run_id"], gate["run_id"], napping["run_id"]].index)

    def of(run) -> list[tuple]:
        return [(r["step"], r["kind"], r["task_id"], r["attempt"], r["status"], r["error"])
                for r in rows if r["run_id"] == run["run_id"]]

    f = flaky["run_id"]
    assert of(flaky) == [
        ("once", "task", f"{f}:once:1", "1", "failed", "HandlerFailed: failed on purpose"),
        ("once", "task", f"{f}:once:2", "2", "succeeded", ""),
        ("after", "task", f"{f}:after:1", "1", "succeeded", ""),
    ]
    s = saga["run_id"]
    assert of(saga) == [
        ("reserve", "task", f"{s}:reserve:1", "1", "succeeded", ""),
        ("boom", "task", f"{s}:boom:1", "1", "failed", "NonRetryableError: kaput"),
        ("reserve", "compensation", f"{s}:reserve:compensate:1", "1", "succeeded", ""),
    ]
    t = stuck["run_id"]
    timeout = "Timeout: step 'nap' timed out after 0.05s"
    assert of(stuck) == [("nap", "task", f"{t}:nap:1", "1", "failed", timeout),
                         ("nap", "task", f"{t}:nap:2", "2", "failed", timeout)]
    assert of(gate)[1] == ("gate", "wait_for_signal", "", "0", "waiting", "")
    assert of(napping) == [("nap", "task", f"{napping['run_id']}:nap:1", "1", "cancelled", "")]

    for row in rows:
        assert row["workflow"] and row["version"] and row["started_at"].endswith("Z")
        if row["finished_at"]:
            started, ended = (datetime.fromisoformat(row[k].replace("Z", "+00:00")) for k in ("started_at", "finished_at"))
            assert float(row["duration_s"]) == pytest.approx((ended - started).total_seconds(), abs=0.002)
    jsonl = [orjson.loads(line) for line in (await export(api, "steps", "format=jsonl"))[0].splitlines()]
    assert [(j["run_id"], j["task_id"] or "", str(j["attempt"])) for j in jsonl] == [
        (r["run_id"], r["task_id"], r["attempt"]) for r in rows]
    assert all(tuple(j) == STEP_COLUMNS for j in jsonl)


async def test_bad_queries_are_400_naming_the_parameter(api):
    for query, field in (("format=xml", "format"), ("since=yesterday", "since"), ("until=nan", "until"),
                         ("status=done", "status")):
        for what in ("runs", "steps"):
            body = await call(api, "GET", f"/v1/export/{what}?{query}", 400)
            assert body["error"]["field"] == field, (query, body)
    body = await call(api, "GET", "/v1/export/runs?format=xml", 400)
    assert "csv or jsonl" in body["error"]["message"]


async def test_a_failure_mid_export_cuts_the_transfer_and_the_client_says_so():
    """Once the 200 is out, a failing page cannot become an error response: the connection is
    cut before the last chunk, and the client reports a truncated export, not a short file."""

    async def pages():
        yield [{"a": 1}]
        yield [{"a": 2}]
        raise StoreError("the disk is full")

    async def handler(request):
        return await _stream(request, "runs", "jsonl", ("a",), pages())

    app = web.Application(middlewares=[errors.middleware(4096)])
    app.router.add_get("/v1/export/runs", handler)
    async with TestServer(app, host="127.0.0.1") as server:
        client = BatonClient(str(server.make_url("")))
        received: list[bytes] = []

        def read() -> None:
            for chunk in client.export("runs", fmt="jsonl"):
                received.append(chunk)

        with pytest.raises(ClientError) as failure:
            await asyncio.to_thread(read)
    assert failure.value.code == "truncated"
    assert b"".join(received) == b'{"a":1}\n{"a":2}\n'  # what came before the failure


async def test_the_store_pages_runs_by_keyset_even_when_times_tie(tmp_path):
    store = SQLiteStore(tmp_path / "db.sqlite")
    await store.open()
    try:
        rows = [RunRow(f"r{i:02d}", "w" if i % 2 else "v", "1", "h", None, "succeeded", float(i // 3), 0.0, None, 0,
                       b"{}") for i in range(10)]
        await store.commit(Batch(runs=rows[::-1]))  # written in another order than they list

        async def ids(**filters) -> list[list[str]]:
            return [[r.run_id for r in page] async for page in store.iter_runs(page_size=3, **filters)]

        everything = await ids()
        assert [len(page) for page in everything] == [3, 3, 3, 1]
        assert sum(everything, []) == [f"r{i:02d}" for i in range(10)]  # (created_at, run_id), each once
        assert sum(await ids(since=1.0, until=3.0), []) == [f"r{i:02d}" for i in range(3, 9)]
        assert sum(await ids(workflow="w"), []) == [f"r{i:02d}" for i in range(1, 10, 2)]
        assert await ids(since=100.0) == []
    finally:
        await store.close()


def test_baton_export_streams_parseable_csv_from_a_real_server(tmp_path):
    wf = write_workflows(tmp_path)
    server = ServerProcess(tmp_path / "data", wf, BATON_NATS__ENABLED="false", BATON_AUDIT__EXPORT_PAGE_SIZE="2")
    server.start()
    try:
        runs = [server.request("POST", "/v1/workflows/greet/runs", {"input": {"name": f"n{i}"}})[1] for i in range(5)]
        for run in runs:
            status, done = server.request("GET", f"/v1/runs/{run['run_id']}/wait?timeout=10", timeout_s=20)
            assert status == 200 and done["status"] == "succeeded", done
        base = [sys.executable, "-m", "server", "export"]
        env = {"PATH": "/usr/bin:/bin", "BATON_CONFIG": str(tmp_path / "data" / "empty-config.yaml")}

        def baton_export(*args: str) -> str:
            result = subprocess.run([*base, *args, "--url", server.url], cwd=REPO, env=env, capture_output=True,
                                    timeout=60)
            assert result.returncode == 0, result.stderr.decode()
            return result.stdout.decode()

        rows = rows_of(baton_export("runs", "--since", "2026-01-01", "--format", "csv"))
        assert [(r["run_id"], r["status"], r["workflow"], r["attempt"]) for r in rows] == [
            (run["run_id"], "succeeded", "greet", "1") for run in runs]
        assert rows_of(baton_export("runs", "--since", iso(time.time() + 3600))) == []
        steps = [orjson.loads(line) for line in baton_export("steps", "--format", "jsonl").splitlines()]
        assert [(s["run_id"], s["step"]) for s in steps] == [
            (run["run_id"], step) for run in runs for step in ("hello", "shout")]
        bad = subprocess.run([*base, "runs", "--format", "xml", "--url", server.url], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "csv or jsonl" in bad.stderr
        bad = subprocess.run([*base, "runs", "--since", "soon", "--url", server.url], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 1 and "since" in bad.stderr
    finally:
        server.stop()
