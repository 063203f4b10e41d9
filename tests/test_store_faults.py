"""Store faults: the database stops taking writes (disk full, read-only, an I/O error).

What must hold, and the test that shows it:
* while commits fail, `/readyz` is 503 and the API refuses new work with a 503 that names
  the store's problem, instead of taking what it cannot record;
* a handler's result whose commit failed is recorded once the store is back, without a
  restart and without running the handler again (the runtime holds the outcome);
* the runtime notices the store is back by itself (a probe writes a `store.recovered`
  audit entry), even when nothing else commits;
* a start that was never stored holds no concurrency slot;
* the database stays intact (`PRAGMA integrity_check`) and keeps what was committed before.

The fast tests fail commits through the store seam (a SQLiteStore whose `commit` raises
StoreError while a flag is set). One test uses a real fault on a server process: a file
size limit (RLIMIT_FSIZE, set on the running server with prlimit), which the kernel
enforces on every user, root included, so SQLite's writes fail with EFBIG as on a full
disk. chmod cannot make a directory read-only for root (the tests may run as root), and
mounting a small tmpfs needs privileges, so neither is used.
"""

from __future__ import annotations

import asyncio
import resource
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest

import server.app
import server.triggers.events as trigger_events
from handlers import handler
from server.errors import StoreError
from server.settings import Settings
from server.store.base import Batch
from server.store.sqlite import SQLiteStore
from server.triggers.events import event_run_id
from tests.inproc import api_client, call, eventually, runtime_of
from tests.serverproc import ServerProcess

HELD = """\
name: held
steps:
  - id: hold
    task: storefault.hold
    input: {n: "{{ input.n }}"}
  - id: after
    task: echo
    input: {n: "{{ steps.hold.output.n }}"}
"""

SINGLE = """\
name: single
concurrency: {limit: 1}
steps:
  - id: only
    task: echo
    input: {ok: true}
"""

PARENT = """\
name: parent
steps:
  - id: first
    task: echo
    input: {ok: true}
  - id: kid
    workflow: {name: quick}
"""

QUICK = """\
name: quick
steps:
  - id: only
    task: echo
    input: {ok: true}
"""

# The handler the tests hold open: each call is counted, and returns once released.
_HOLD: dict[str, Any] = {}


@handler("storefault.hold")
async def hold(ctx, n: Any = None) -> dict[str, Any]:
    _HOLD["calls"].append(ctx.task_id)
    await _HOLD["release"].wait()
    return {"n": n}


class FaultyStore(SQLiteStore):
    """The store seam: while `failing` is set, every commit fails as on a full disk (reads
    work); `fails` picks the batches to fail instead, when set."""

    failing = False
    fails: Callable[[Batch], bool] | None = None

    async def commit(self, batch: Batch) -> None:
        if self.failing or (self.fails is not None and self.fails(batch)):
            raise StoreError(f"the disk is full: {self.path}: injected by the test")
        await super().commit(batch)


def faulty_stores(monkeypatch) -> list[FaultyStore]:
    """The wiring opens a FaultyStore instead of a SQLiteStore; the list gets it once open."""
    stores: list[FaultyStore] = []

    def make_store(settings: Settings) -> FaultyStore:
        stores.append(FaultyStore(settings.db_path, synchronous=settings.sqlite_sync))
        return stores[-1]

    monkeypatch.setattr(server.app, "make_store", make_store)
    return stores


def write_workflows(tmp_path: Path) -> Path:
    wf = tmp_path / "wf"
    wf.mkdir(exist_ok=True)
    for name, text in (("held", HELD), ("single", SINGLE), ("quick", QUICK), ("parent", PARENT)):
        (wf / f"{name}.yaml").write_text(text)
    return wf


@pytest.fixture
async def faulty(tmp_path, monkeypatch):
    """(API client, the FaultyStore under it), NATS off: the store is what is under test."""
    monkeypatch.chdir(tmp_path)  # keep the repository's config/baton.yaml out of it
    _HOLD.update(calls=[], release=asyncio.Event())
    stores = faulty_stores(monkeypatch)
    settings = Settings(data_dir=tmp_path / "data", workflows=[write_workflows(tmp_path)], handler_modules=[],
                        auth={"enabled": False}, nats={"enabled": False}, limits={"shutdown_grace_s": 0.2})
    async with api_client(settings) as client:
        yield client, stores[0]
    _HOLD["release"].set()


async def start(client, workflow: str, input: Any = None, expect: int = 201) -> dict[str, Any]:  # noqa: A002
    return await call(client, "POST", f"/v1/workflows/{workflow}/runs", expect, json={"input": input or {}})


async def readyz(client) -> tuple[int, dict[str, Any]]:
    response = await client.get("/readyz")
    return response.status, await response.json()


def integrity_and_runs(db: Path) -> tuple[str, dict[str, str]]:
    """PRAGMA integrity_check and {run_id: status}, read with a connection of our own."""
    conn = sqlite3.connect(db)
    try:
        check = "\n".join(row[0] for row in conn.execute("PRAGMA integrity_check"))
        return check, dict(conn.execute("SELECT run_id, status FROM runs"))
    finally:
        conn.close()


async def test_a_failing_store_refuses_new_work_and_records_held_results_once_it_is_back(faulty):
    client, store = faulty
    runtime = runtime_of(client)
    before = await start(client, "quick")
    assert (await call(client, "GET", f"/v1/runs/{before['run_id']}/wait?timeout=10"))["status"] == "succeeded"
    runs = [(await start(client, "held", {"n": i}))["run_id"] for i in range(3)]
    await eventually(_now(lambda: len(_HOLD["calls"]) == 3), "the three handlers to be running")

    store.failing = True
    _HOLD["release"].set()  # their results now meet a store that refuses them
    await eventually(_now(lambda: runtime.health()["store"] == "failing"), "a failed commit to be noticed")
    status, body = await readyz(client)
    assert status == 503 and body["error"]["code"] == "not_ready", body
    assert "store failing" in body["error"]["message"]
    refused = await start(client, "quick", expect=503)
    assert refused["error"]["code"] == "store_error"
    assert "takes no new work while its store fails: the disk is full" in refused["error"]["message"]
    listed = await call(client, "GET", "/v1/runs?workflow=quick")  # reads still work
    assert [r["run_id"] for r in listed["runs"]] == [before["run_id"]]

    store.failing = False  # nothing commits by itself now: the probe must find out
    await eventually(_ready(client), "/readyz to say ready again")
    for run_id in runs:
        done = await call(client, "GET", f"/v1/runs/{run_id}/wait?timeout=10")
        assert done["status"] == "succeeded", done
        history = await call(client, "GET", f"/v1/runs/{run_id}/history")
        assert [e["key"] for e in history["events"] if e["type"] == "task.succeeded"] == ["hold", "after"], history
    # each handler ran once: its held result was recorded, the attempt was not run again
    assert len(_HOLD["calls"]) == len(set(_HOLD["calls"])) == 3
    audit = await call(client, "GET", "/v1/audit?action=store.recovered")
    (entry,) = audit["entries"]
    assert entry["actor"] == "system" and "the disk is full" in entry["detail"]["error"]
    check, stored = integrity_and_runs(store.path)
    assert check == "ok"
    assert stored[before["run_id"]] == "succeeded"  # committed before the fault: still there
    assert {stored[r] for r in runs} == {"succeeded"}


async def test_a_start_whose_commit_failed_holds_no_concurrency_slot(faulty):
    client, store = faulty
    store.failing = True
    refused = await start(client, "single", expect=503)  # decided, slot taken, commit failed
    assert "the disk is full" in refused["error"]["message"]
    store.failing = False
    await eventually(_ready(client), "/readyz to say ready again")
    run = await start(client, "single")
    done = await call(client, "GET", f"/v1/runs/{run['run_id']}/wait?timeout=10")
    assert done["status"] == "succeeded", done  # not queued behind a run that was never stored
    assert [r["run_id"] for r in (await call(client, "GET", "/v1/runs?workflow=single"))["runs"]] == [run["run_id"]]


EVENTED = """\
name: evented
triggers:
  - event: {subject: "storefault.events"}
steps:
  - id: only
    task: echo
    input: {i: "{{ input.i }}"}
"""


async def test_an_event_that_arrives_while_the_store_fails_is_left_for_redelivery(tmp_path, monkeypatch,
                                                                                    nats_server):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trigger_events, "RETRY_DELAY_S", 0.05)  # the nak's delay: redelivered soon after
    stores = faulty_stores(monkeypatch)
    wf = tmp_path / "wf"
    wf.mkdir()
    (wf / "evented.yaml").write_text(EVENTED)
    settings = Settings(data_dir=tmp_path / "data", workflows=[wf], handler_modules=[], auth={"enabled": False},
                        nats_url=nats_server.url, limits={"shutdown_grace_s": 0.2})
    async with api_client(settings) as client:
        runtime, (store,) = runtime_of(client), stores
        triggers = runtime.triggers
        store.failing = True
        nc = await nats.connect(nats_server.url)
        try:
            await nc.jetstream().publish("storefault.events", orjson.dumps({"i": 7}), headers={"Nats-Msg-Id": "e7"})
        finally:
            await nc.close()
        await eventually(_now(lambda: triggers.stats["retried"] >= 1), "the event to be nak'ed")
        assert await store.get_event("msg:e7") is None  # not recorded, so not acknowledged as handled
        assert (await call(client, "GET", "/v1/runs?workflow=evented"))["runs"] == []
        store.failing = False
        await eventually(_ready(client), "/readyz to say ready again")
        run_id = event_run_id("msg:e7", "evented", 0)
        await eventually(lambda: store.get_run(run_id), "the redelivered event to start its run")
        done = await call(client, "GET", f"/v1/runs/{run_id}/wait?timeout=10")
        assert done["status"] == "succeeded", done
        await eventually(lambda: _equals(triggers.consumer_lag(), (0, 0)), "the event to be acknowledged")
        assert [r["run_id"] for r in (await call(client, "GET", "/v1/runs?workflow=evented"))["runs"]] == [run_id]


async def _equals(value: Any, expected: Any) -> bool:
    return await value == expected


async def test_a_child_run_the_store_refused_to_start_starts_once_it_is_back(faulty):
    client, store = faulty
    runtime = runtime_of(client)
    store.fails = lambda batch: any(row.workflow == "quick" for row in batch.runs)  # only the child's start
    parent = await start(client, "parent")
    await eventually(_now(lambda: runtime._held_children), "the child's start to be refused and held")
    store.fails = None
    done = await call(client, "GET", f"/v1/runs/{parent['run_id']}/wait?timeout=10")
    assert done["status"] == "succeeded", done  # the store's failure is not the child's
    (child,) = (await call(client, "GET", "/v1/runs?workflow=quick"))["runs"]
    assert child["status"] == "succeeded"
    assert integrity_and_runs(store.path)[0] == "ok"


def _now(predicate):
    async def check() -> Any:
        return predicate()
    return check


def _ready(client):
    async def ready() -> bool:
        return (await readyz(client))[0] == 200
    return ready


# -- a real fault: a file size limit on the server process -------------------------------

DOZE = """\
name: doze
steps:
  - id: nap
    sleep: 2s
  - id: note
    task: echo
    input: {text: "{{ input.text }}"}
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prlimit on another process is Linux only")
def test_a_real_write_failure_on_the_server_process_is_survived_and_leaves_the_database_intact(tmp_path):
    wf = tmp_path / "wf"
    wf.mkdir()
    (wf / "doze.yaml").write_text(DOZE)
    (wf / "quick.yaml").write_text(QUICK)
    srv = ServerProcess(tmp_path / "data", wf, BATON_NATS__ENABLED="false", BATON_LOG_LEVEL="ERROR")
    srv.start()
    try:
        db = next((tmp_path / "data").glob("*.db"))
        before = srv.request("POST", "/v1/workflows/quick/runs", {"input": {}})[1]["run_id"]
        assert srv.request("GET", f"/v1/runs/{before}/wait?timeout=10")[1]["status"] == "succeeded"
        dozing = [srv.request("POST", "/v1/workflows/doze/runs", {"input": {"text": f"run {i}"}})[1]["run_id"]
                  for i in range(5)]
        # From now on no file of the server may grow (the database, its WAL, the log): the next
        # commit fails with EFBIG as on a full disk. Nothing commits until the durable sleeps
        # end (the API's own audit entries are written before its answers), so the first
        # failing commit is the one of the timer firings, and of nothing else.
        files = [db, Path(f"{db}-wal"), srv.log]
        limit = max(f.stat().st_size for f in files if f.exists())
        resource.prlimit(srv.proc.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        try:
            srv.wait_for(lambda: srv.request("GET", "/readyz")[0] == 503, "readyz to report the failing store")
            status, body = srv.request("GET", "/readyz")
            assert "store failing" in body["error"]["message"], body
            status, body = srv.request("POST", "/v1/workflows/quick/runs", {"input": {}})
            assert status == 503 and body["error"]["code"] == "store_error", body
            assert ("takes no new work while its store fails: cannot write the database file (is the disk full"
                    in body["error"]["message"]), body
            # the firings are not recorded: the runs still sleep, as far as the database knows
            assert {srv.request("GET", f"/v1/runs/{r}")[1]["status"] for r in dozing} == {"running"}
        finally:
            resource.prlimit(srv.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        srv.wait_for(lambda: srv.request("GET", "/readyz")[0] == 200, "readyz to say ready once the limit is gone")
        for run_id in dozing:  # without a restart, and long before the timers' next refill
            assert srv.request("GET", f"/v1/runs/{run_id}/wait?timeout=10")[1]["status"] == "succeeded", run_id
        after = srv.request("POST", "/v1/workflows/quick/runs", {"input": {}})[1]["run_id"]
        assert srv.request("GET", f"/v1/runs/{after}/wait?timeout=10")[1]["status"] == "succeeded"
        assert srv.stop() == 0
    finally:
        srv.stop()
    check, stored = integrity_and_runs(db)
    assert check == "ok"
    assert {stored[r] for r in [before, *dozing, after]} == {"succeeded"}
