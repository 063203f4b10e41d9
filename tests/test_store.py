"""The stores against a real SQLite file in tmp_path and a real PostgreSQL database (the
`store` fixture runs each test on both): no mocks."""

from __future__ import annotations

import asyncio
import base64
import random
import sqlite3
import stat
from dataclasses import replace
from pathlib import Path

import pytest

from server.errors import BadRequest, Conflict, StoreError
from server.store.base import (
    TERMINAL,
    Batch,
    DefinitionRow,
    HistoryRow,
    RunRow,
    StepRow,
    TimerRow,
)
from server.store.postgres import PostgresStore
from server.store.sqlite import SQLiteStore, encode_cursor, map_error


def run(run_id: str, *, workflow: str = "order", workflow_id: str | None = None, status: str = "running",
        created_at: float = 100.0, inflight: int = 0, data: bytes = b"{}") -> RunRow:
    return RunRow(run_id, workflow, "1", "hash-1", workflow_id, status, created_at, created_at, None, inflight, data)


def step(run_id: str, key: str, *, status: str = "running", attempt: int = 1, data: bytes = b"{}") -> StepRow:
    return StepRow(run_id, key, key.split("[")[0], status, attempt, 1.0, None, data)


def event(run_id: str, seq: int, type_: str = "step.succeeded") -> HistoryRow:
    return HistoryRow(run_id, seq, float(seq), type_, "a", b'{"n": %d}' % seq)




async def reopened(s: SQLiteStore | PostgresStore) -> SQLiteStore | PostgresStore:
    await s.close()
    again = SQLiteStore(s.path) if isinstance(s, SQLiteStore) else PostgresStore(s.url)
    await again.open()
    return again


# -- round trips and upserts -----------------------------------------------------


async def test_every_record_round_trips(store: SQLiteStore):
    r = RunRow("r1", "order", "3", "abc", "order-7", "running", 10.5, 11.25, None, 2, b'{"input": {"x": 1}}')
    s = StepRow("r1", "reserve", "reserve", "succeeded", 2, 10.5, 11.0, b"\x00\xffbinary")
    h = HistoryRow("r1", 1, 10.5, "run.started", None, b"{}")
    t = TimerRow("r1", "approve.timeout", 99.5)
    d = DefinitionRow("abc", "order", "3", b"name: order\n", 9.0)
    await store.commit(Batch(runs=[r], steps=[s], history=[h], timers_set=[t]))
    await store.put_definition(d)

    assert await store.get_run("r1") == replace(r, rev=1)  # the first write of a run stores revision 1
    assert await store.get_steps("r1") == [s]
    assert await store.history("r1") == [h]
    assert await store.due_timers(100.0, 10) == [t]
    assert await store.get_definition("abc") == d
    assert isinstance((await store.get_run("r1")).data, bytes)


async def test_missing_records_are_none_or_empty(store: SQLiteStore):
    assert await store.get_run("nope") is None
    assert await store.get_runs(["nope"]) == []
    assert await store.get_steps("nope") == []
    assert await store.history("nope") == []
    assert await store.find_open_run("order", "nope") is None
    assert await store.get_definition("nope") is None
    assert await store.next_timer_at() is None
    assert await store.count_timers() == 0


async def test_run_upsert_updates_state_and_keeps_identity(store: SQLiteStore):
    await store.commit(Batch(runs=[run("r1", workflow_id="k", created_at=5.0)]))
    later = RunRow("r1", "other", "9", "hash-9", "k2", "succeeded", 50.0, 60.0, 60.0, 0, b'{"done": true}')
    await store.commit(Batch(runs=[later]))

    assert await store.get_run("r1") == RunRow(
        "r1", "order", "1", "hash-1", "k", "succeeded", 5.0, 60.0, 60.0, 0, b'{"done": true}', rev=2
    )


async def test_step_upsert_keeps_its_place_and_a_rewritten_step_goes_last(store: SQLiteStore):
    await store.commit(Batch(steps=[step("r1", "a"), step("r1", "b"), step("r1", "c")]))
    await store.commit(Batch(steps=[step("r1", "a", status="succeeded", attempt=2)]))
    assert [(s.key, s.status, s.attempt) for s in await store.get_steps("r1")] == [
        ("a", "succeeded", 2), ("b", "running", 1), ("c", "running", 1),
    ]

    await store.commit(Batch(steps_deleted=[("r1", "a")]))
    await store.commit(Batch(steps=[step("r1", "a", attempt=3)]))
    assert [(s.key, s.attempt) for s in await store.get_steps("r1")] == [("b", 1), ("c", 1), ("a", 3)]


async def test_within_a_batch_upserts_apply_before_deletes(store: SQLiteStore):
    await store.commit(Batch(
        steps=[step("r1", "a"), step("r1", "b")], steps_deleted=[("r1", "a")],
        timers_set=[TimerRow("r1", "t1", 1.0), TimerRow("r1", "t2", 2.0)], timers_deleted=[("r1", "t1")],
    ))
    assert [s.key for s in await store.get_steps("r1")] == ["b"]
    assert [t.timer_id for t in await store.due_timers(10.0, 10)] == ["t2"]


async def test_get_runs_follows_the_order_asked_and_skips_missing(store: SQLiteStore):
    await store.commit(Batch(runs=[run(f"r{i}") for i in range(1000)]))
    asked = ["r999", "missing", "r5", "r500", "r5"]
    assert [r.run_id for r in await store.get_runs(asked)] == ["r999", "r5", "r500", "r5"]
    assert len(await store.get_runs([f"r{i}" for i in range(1000)])) == 1000  # more than one IN (...) chunk


# -- group commit ------------------------------------------------------------------


async def test_concurrent_commits_share_transactions(store: SQLiteStore):
    batches = [
        Batch(runs=[run(f"r{i}")], steps=[step(f"r{i}", "a")], history=[event(f"r{i}", 1)]) for i in range(200)
    ]
    await asyncio.gather(*(store.commit(b) for b in batches))

    assert store.stats.batches == 200
    assert store.stats.transactions <= 20
    assert len(await store.get_runs([f"r{i}" for i in range(200)])) == 200
    assert all([await store.history(f"r{i}") == [event(f"r{i}", 1)] for i in range(200)])


def random_batches(rng: random.Random, count: int) -> list[Batch]:
    """Batches that keep writing and deleting the same few steps and timers."""
    batches = []
    for n in range(count):
        keys = [("r1", k) for k in "abcd"]
        batches.append(Batch(
            runs=[run(rng.choice(["r1", "r2"]), inflight=n)],
            steps=[step(*k, attempt=n) for k in rng.sample(keys, rng.randint(0, 2))],
            steps_deleted=rng.sample(keys, rng.randint(0, 1)),
            timers_set=[TimerRow(*k, float(n)) for k in rng.sample(keys, rng.randint(0, 2))],
            timers_deleted=rng.sample(keys, rng.randint(0, 1)),
        ))
    return batches


async def snapshot(s: SQLiteStore) -> tuple:
    return (
        await s.get_runs(["r1", "r2"]),
        await s.get_steps("r1"),  # order matters: a re-inserted step goes last
        await s.due_timers(float("inf"), 1000),
    )


@pytest.mark.parametrize("seed", range(5))
async def test_a_group_ends_like_the_same_batches_committed_one_by_one(tmp_path: Path, seed: int):
    grouped, single = SQLiteStore(tmp_path / "grouped.db"), SQLiteStore(tmp_path / "single.db")
    await grouped.open()
    await single.open()
    try:
        for b in [Batch(steps=[step("r1", k) for k in "abcd"])] + random_batches(random.Random(seed), 60):
            await single.commit(b)
        await grouped.commit(Batch(steps=[step("r1", k) for k in "abcd"]))
        await asyncio.gather(*(grouped.commit(b) for b in random_batches(random.Random(seed), 60)))

        assert grouped.stats.transactions < single.stats.transactions
        assert await snapshot(grouped) == await snapshot(single)
    finally:
        await grouped.close()
        await single.close()


async def test_close_writes_what_was_committed_before_it(tmp_path: Path):
    s = SQLiteStore(tmp_path / "baton.db")
    await s.open()
    commits = [asyncio.ensure_future(s.commit(Batch(runs=[run(f"r{i}")]))) for i in range(50)]
    await asyncio.sleep(0)  # the commits are queued
    s = await reopened(s)
    try:
        await asyncio.gather(*commits)
        assert len(await s.get_runs([f"r{i}" for i in range(50)])) == 50
    finally:
        await s.close()


async def test_commit_on_a_closed_store_is_a_store_error(tmp_path: Path):
    s = SQLiteStore(tmp_path / "baton.db")
    with pytest.raises(StoreError, match="not open"):
        await s.commit(Batch())
    await s.open()
    await s.close()
    with pytest.raises(StoreError, match="not open"):
        await s.commit(Batch(runs=[run("r1")]))
    with pytest.raises(StoreError, match="not open"):
        await s.get_run("r1")


# -- constraints: only the offending caller fails --------------------------------


async def test_second_open_run_with_a_workflow_id_fails_alone(store: SQLiteStore):
    first = store.commit(Batch(runs=[run("r1", workflow_id="order-7")], history=[event("r1", 1)]))
    duplicate = store.commit(Batch(runs=[run("r2", workflow_id="order-7")], history=[event("r2", 1)]))
    unrelated = store.commit(Batch(runs=[run("r3", workflow_id="order-8")], history=[event("r3", 1)]))
    results = await asyncio.gather(first, duplicate, unrelated, return_exceptions=True)

    assert results[0] is None and results[2] is None
    assert isinstance(results[1], Conflict)
    assert "workflow_id" in results[1].message
    assert store.stats.retried_groups == 1
    assert (await store.find_open_run("order", "order-7")).run_id == "r1"
    assert await store.get_run("r2") is None and await store.history("r2") == []  # nothing of it
    assert await store.get_run("r3") is not None


async def test_the_same_workflow_id_in_another_workflow_is_fine(store: SQLiteStore):
    await store.commit(Batch(runs=[run("r1", workflow="a", workflow_id="k")]))
    await store.commit(Batch(runs=[run("r2", workflow="b", workflow_id="k")]))
    await store.commit(Batch(runs=[run("r3"), run("r4")]))  # no workflow_id: never unique
    assert (await store.find_open_run("b", "k")).run_id == "r2"


@pytest.mark.parametrize("terminal", TERMINAL)
async def test_a_finished_run_frees_its_workflow_id(store: SQLiteStore, terminal: str):
    await store.commit(Batch(runs=[run("r1", workflow_id="k")]))
    with pytest.raises(Conflict):
        await store.commit(Batch(runs=[run("r2", workflow_id="k")]))

    await store.commit(Batch(runs=[run("r1", workflow_id="k", status=terminal)]))
    assert await store.find_open_run("order", "k") is None
    await store.commit(Batch(runs=[run("r2", workflow_id="k", status="queued")]))
    assert (await store.find_open_run("order", "k")).run_id == "r2"


async def test_a_history_seq_is_written_once(store: SQLiteStore):
    await store.commit(Batch(history=[event("r1", 1)]))
    with pytest.raises(Conflict, match="history"):
        await store.commit(Batch(runs=[run("r1")], history=[event("r1", 2), event("r1", 1)]))
    assert await store.get_run("r1") is None
    assert [h.seq for h in await store.history("r1")] == [1]


async def test_a_value_sqlite_cannot_store_fails_only_its_batch(store: SQLiteStore):
    bad = store.commit(Batch(runs=[run("r1", data={"not": "bytes"})]))  # type: ignore[arg-type]
    good = store.commit(Batch(runs=[run("r2")]))
    results = await asyncio.gather(bad, good, return_exceptions=True)

    assert isinstance(results[0], StoreError)
    assert results[1] is None
    assert await store.get_run("r2") is not None


@pytest.mark.sqlite_only
async def test_a_full_disk_fails_every_batch_of_the_group(store: SQLiteStore):
    await store.commit(Batch(runs=[run("r0")]))
    # Private hook: cap the file at its current size, as a full disk would.
    await store._on_thread(store._conn.execute, "PRAGMA max_page_count = 1")
    big = store.commit(Batch(runs=[run("r1", data=b"x" * 200_000)]))
    small = store.commit(Batch(runs=[run("r2")]))
    results = await asyncio.gather(big, small, return_exceptions=True)

    assert [type(r) for r in results] == [StoreError, StoreError]
    assert all("disk is full" in r.message for r in results)
    await store._on_thread(store._conn.execute, "PRAGMA max_page_count = 1073741823")
    await store.commit(Batch(runs=[run("r3")]))
    assert [r.run_id for r in await store.get_runs(["r0", "r1", "r2", "r3"])] == ["r0", "r3"]
    assert await store.integrity_check() == "ok"


# -- queries -----------------------------------------------------------------------


async def seed_runs(store: SQLiteStore) -> list[RunRow]:
    rows = [
        run("a1", workflow="a", status="succeeded", created_at=1.0, workflow_id="x"),
        run("a2", workflow="a", status="running", created_at=2.0),
        run("b1", workflow="b", status="running", created_at=2.0, workflow_id="x"),
        run("b2", workflow="b", status="failed", created_at=3.0),
        run("a3", workflow="a", status="queued", created_at=4.0),
    ]
    await store.commit(Batch(runs=rows))
    return rows


@pytest.mark.parametrize(("filters", "expected"), [
    ({}, ["a3", "b2", "b1", "a2", "a1"]),
    ({"workflow": "a"}, ["a3", "a2", "a1"]),
    ({"status": "running"}, ["b1", "a2"]),
    ({"workflow": "a", "status": "running"}, ["a2"]),
    ({"workflow_id": "x"}, ["b1", "a1"]),
    ({"since": 2.0}, ["a3", "b2", "b1", "a2"]),
    ({"until": 3.0}, ["b1", "a2", "a1"]),
    ({"since": 2.0, "until": 3.0, "workflow": "b"}, ["b1"]),
    ({"status": "cancelled"}, []),
])
async def test_list_runs_filters_newest_first(store: SQLiteStore, filters: dict, expected: list[str]):
    await seed_runs(store)
    rows, cursor = await store.list_runs(**filters)
    assert [r.run_id for r in rows] == expected
    assert cursor is None


async def test_list_runs_pages_without_gaps_or_duplicates(store: SQLiteStore):
    # Many runs share a created_at, so pages must break ties by run_id.
    rows = [run(f"r{i:02d}", workflow="a" if i % 3 else "b", created_at=float(i // 4)) for i in range(43)]
    await store.commit(Batch(runs=rows))
    for filters, size in (({}, 5), ({}, 43), ({"workflow": "a"}, 4), ({"since": 3.0, "until": 8.0}, 3)):
        everything, _ = await store.list_runs(limit=1000, **filters)
        pages, cursor = [], None
        while True:
            page, cursor = await store.list_runs(limit=size, cursor=cursor, **filters)
            pages.append(page)
            if cursor is None:
                break
        seen = [r.run_id for page in pages for r in page]
        assert seen == [r.run_id for r in everything]
        assert len(set(seen)) == len(seen)
        assert all(len(page) == size for page in pages[:-1]) and 0 < len(pages[-1]) <= size


@pytest.mark.parametrize("cursor", [
    "garbage!",
    "",
    base64.urlsafe_b64encode(b"not json").decode(),
    base64.urlsafe_b64encode(b'{"created_at": 1}').decode(),
    base64.urlsafe_b64encode(b'["1.0", "r1"]').decode(),
    base64.urlsafe_b64encode(b"[true, \"r1\"]").decode(),
    base64.urlsafe_b64encode(b"[1.0, 2, 3]").decode(),
])
async def test_a_malformed_cursor_is_a_bad_request(store: SQLiteStore, cursor: str):
    with pytest.raises(BadRequest) as caught:
        await store.list_runs(cursor=cursor)
    assert caught.value.field == "cursor"


async def test_a_cursor_is_url_safe_and_opaque(store: SQLiteStore):
    cursor = encode_cursor(1712345678.123456, "run/with?odd&chars")
    assert all(c.isalnum() or c in "-_" for c in cursor)
    await store.list_runs(cursor=cursor)


async def test_history_is_ordered_by_seq_and_resumes_after_a_seq(store: SQLiteStore):
    await store.commit(Batch(history=[event("r1", 3), event("r1", 1), event("r2", 1)]))
    await store.commit(Batch(history=[event("r1", 2), event("r1", 4)]))

    assert [h.seq for h in await store.history("r1")] == [1, 2, 3, 4]
    assert [h.seq for h in await store.history("r1", after_seq=2)] == [3, 4]
    assert [h.seq for h in await store.history("r1", after_seq=1, limit=2)] == [2, 3]
    assert [h.seq for h in await store.history("r2")] == [1]


async def test_recoverable_runs_are_open_and_in_flight_queued_or_compensating(store: SQLiteStore):
    await store.commit(Batch(runs=[
        run("busy", inflight=2, created_at=1.0),
        run("idle", inflight=0),  # waiting on a timer or signal: the timer loop resumes it
        run("queued", status="queued", created_at=2.0),
        run("undoing", status="compensating", created_at=3.0),
        run("done", status="succeeded", inflight=1),  # stale counter on a finished run
        *(run(f"old{i}", status=TERMINAL[i % len(TERMINAL)]) for i in range(8)),
    ]))
    assert [r.run_id for r in await store.recoverable_runs()] == ["busy", "queued", "undoing"]


async def test_timers_come_due_in_order_and_can_be_moved_or_deleted(store: SQLiteStore):
    await store.commit(Batch(timers_set=[
        TimerRow("r2", "t", 30.0), TimerRow("r1", "t", 10.0), TimerRow("r1", "u", 20.0), TimerRow("r3", "t", 10.0),
    ]))
    assert await store.count_timers() == 4
    assert await store.next_timer_at() == 10.0
    assert await store.due_timers(20.0, 10) == [
        TimerRow("r1", "t", 10.0), TimerRow("r3", "t", 10.0), TimerRow("r1", "u", 20.0),
    ]
    assert await store.due_timers(100.0, 2) == [TimerRow("r1", "t", 10.0), TimerRow("r3", "t", 10.0)]
    assert await store.due_timers(5.0, 10) == []

    await store.commit(Batch(timers_set=[TimerRow("r1", "t", 40.0)], timers_deleted=[("r3", "t"), ("r9", "x")]))
    assert await store.due_timers(100.0, 10) == [
        TimerRow("r1", "u", 20.0), TimerRow("r2", "t", 30.0), TimerRow("r1", "t", 40.0),
    ]
    assert await store.next_timer_at() == 20.0
    assert await store.count_timers() == 3


async def test_definitions_are_stored_once_per_hash(store: SQLiteStore):
    first = DefinitionRow("h1", "order", "1", b"v1", 1.0)
    await store.put_definition(first)
    await store.put_definition(DefinitionRow("h1", "order", "1", b"changed", 5.0))
    await asyncio.gather(
        store.put_definition(DefinitionRow("h2", "order", "2", b"v2", 2.0)),
        store.put_definition(DefinitionRow("h3", "billing", "1", b"b1", 3.0)),
    )
    assert await store.get_definition("h1") == first
    assert [d.def_hash for d in await store.list_definitions()] == ["h3", "h1", "h2"]
    assert [d.def_hash for d in await store.list_definitions("order")] == ["h1", "h2"]
    assert await store.list_definitions("nope") == []


# -- the file: reopen, migrations, failures -----------------------------------------


async def test_data_survives_close_and_reopen(store: SQLiteStore):
    await store.commit(Batch(runs=[run("r1", workflow_id="k")], steps=[step("r1", "a")], history=[event("r1", 1)],
                             timers_set=[TimerRow("r1", "t", 5.0)]))
    await store.put_definition(DefinitionRow("h1", "order", "1", b"src", 1.0))
    before = (await store.get_run("r1"), await store.get_steps("r1"), await store.history("r1"),
              await store.due_timers(10.0, 10), await store.get_definition("h1"))

    again = await reopened(store)
    try:
        after = (await again.get_run("r1"), await again.get_steps("r1"), await again.history("r1"),
                 await again.due_timers(10.0, 10), await again.get_definition("h1"))
        assert after == before
        with pytest.raises(Conflict):  # the partial unique index came back too
            await again.commit(Batch(runs=[run("r2", workflow_id="k")]))
    finally:
        await again.close()


def schema(path: Path) -> tuple[int, list[tuple]]:
    with sqlite3.connect(path) as conn:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        objects = conn.execute("SELECT type, name FROM sqlite_master ORDER BY name").fetchall()
    conn.close()
    return version, objects


async def test_migrations_apply_once(tmp_path: Path):
    path = tmp_path / "nested" / "dir" / "baton.db"  # directories are created
    s = SQLiteStore(path)
    await s.open()
    await s.close()
    first = schema(path)
    s = SQLiteStore(path)
    await s.open()
    await s.close()

    assert schema(path) == first
    assert first[0] >= 1
    assert {"runs", "steps", "history", "timers", "definitions", "runs_open_workflow_id"} <= {n for _, n in first[1]}


async def test_a_database_newer_than_the_code_is_refused(tmp_path: Path):
    path = tmp_path / "baton.db"
    s = SQLiteStore(path)
    await s.open()
    await s.close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version = 999")
    conn.close()

    s = SQLiteStore(path)
    with pytest.raises(StoreError, match="newer"):
        await s.open()
    await s.close()  # a failed open leaves nothing to close


async def test_a_file_that_is_not_a_database_is_a_store_error(tmp_path: Path):
    path = tmp_path / "baton.db"
    path.write_bytes(b"this is not a SQLite file, " * 100)
    with pytest.raises(StoreError, match="not a SQLite database"):
        await SQLiteStore(path).open()
    with pytest.raises(StoreError, match="cannot be opened"):
        await SQLiteStore(tmp_path).open()  # a directory


def can_write(path: Path) -> bool:
    """Try it: root ignores permission bits."""
    try:
        with open(path, "r+b"):
            return True
    except PermissionError:
        return False


@pytest.mark.parametrize("read_only", ["file", "file and directory"])
async def test_a_read_only_database_fails_commits_and_stays_intact(tmp_path: Path, read_only: str):
    path = tmp_path / "db" / "baton.db"
    s = SQLiteStore(path)
    await s.open()
    await s.commit(Batch(runs=[run("r1")], history=[event("r1", 1)]))
    await s.close()

    path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    if read_only == "file and directory":
        path.parent.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if can_write(path):
            pytest.skip("chmod does not stop this user (root) from writing")
        s = SQLiteStore(path)
        try:
            await s.open()  # reads still work where SQLite can open the file read-only
        except StoreError as exc:
            assert "read-only" in exc.message or "cannot be opened" in exc.message
        else:
            try:
                assert (await s.get_run("r1")) is not None
                with pytest.raises(StoreError, match="read-only"):
                    await s.commit(Batch(runs=[run("r2")]))
            finally:
                await s.close()
    finally:
        path.parent.chmod(stat.S_IRWXU)
        for file in path.parent.iterdir():  # SQLite gave -shm the database's mode
            file.chmod(stat.S_IRUSR | stat.S_IWUSR)

    s = SQLiteStore(path)
    await s.open()
    try:
        assert await s.integrity_check() == "ok"
        assert [r.run_id for r in await s.get_runs(["r1", "r2"])] == ["r1"]
        await s.commit(Batch(runs=[run("r2")]))
    finally:
        await s.close()


async def test_integrity_check_is_ok(store: SQLiteStore):
    await store.commit(Batch(runs=[run("r1")], steps=[step("r1", "a")], history=[event("r1", 1)]))
    assert await store.integrity_check() == "ok"


async def test_synchronous_full_works_and_other_values_are_refused(tmp_path: Path):
    s = SQLiteStore(tmp_path / "baton.db", synchronous="FULL")
    await s.open()
    try:
        await s.commit(Batch(runs=[run("r1")]))
        assert await s.get_run("r1") is not None
    finally:
        await s.close()
    with pytest.raises(ValueError, match="synchronous"):
        SQLiteStore(tmp_path / "baton.db", synchronous="off")
    with pytest.raises(ValueError, match="file path"):
        SQLiteStore(":memory:")


@pytest.mark.parametrize(("make_error", "expected", "words"), [
    (lambda c: c.execute("INSERT INTO t VALUES (1), (1)"), Conflict, "already recorded: t.id"),
    (lambda c: c.execute("INSERT INTO t VALUES (NULL)"), StoreError, "SQLITE_CONSTRAINT_NOTNULL"),
    (lambda c: c.execute("PRAGMA query_only = ON").execute("INSERT INTO t VALUES (2)"), StoreError, "read-only"),
    (lambda c: c.execute("SELECT * FROM missing"), StoreError, "no such table"),
])
def test_sqlite_errors_map_to_baton_errors(tmp_path: Path, make_error, expected, words: str):
    conn = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    conn.execute("CREATE TABLE t (id INTEGER NOT NULL UNIQUE)")
    with pytest.raises(sqlite3.Error) as caught:
        make_error(conn)
    conn.close()

    error = map_error(caught.value, "t.db")
    assert type(error) is expected
    assert words in error.message
    assert error.__cause__ is caught.value
