"""What several replicas on one database rely on, on both stores: run revisions (a write
over a revision someone else changed fails alone, with Stale) and leases (one holder at a
time, fencing tokens that only grow, batches refused once their lease is lost). Then what
is PostgreSQL's own: migrations that replicas run at once, and errors that name the
database without its password."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import asyncpg
import pytest

from server.errors import Conflict, Fenced, Stale, StoreError
from server.settings import Settings
from server.store import make_store
from server.store.base import Batch, HistoryRow, RunRow, ScheduleRow
from server.store.batching import make_plan, migrations
from server.store.postgres import PostgresStore
from server.store.sqlite import SQLiteStore


def run(run_id: str, rev: int = 0, *, status: str = "running") -> RunRow:
    return RunRow(run_id, "order", "1", "hash-1", None, status, 100.0, 100.0, None, 0, b"{}", rev=rev)


def event(run_id: str, seq: int) -> HistoryRow:
    return HistoryRow(run_id, seq, float(seq), "step.succeeded", "a", b"{}")


@pytest.fixture(params=["sqlite", "postgres"])
async def checked(request, tmp_path):
    """A fresh store of each kind that checks run revisions."""
    if request.param == "sqlite":
        s: SQLiteStore | PostgresStore = SQLiteStore(tmp_path / "baton.db", check_revs=True)
    else:
        s = PostgresStore(request.getfixturevalue("postgres_url"), check_revs=True)
    await s.open()
    yield s
    await s.close()


# -- run revisions ---------------------------------------------------------------


async def test_each_write_of_a_run_bumps_its_rev_and_reads_return_it(checked):
    await checked.commit(Batch(runs=[run("r1")]))
    assert (await checked.get_run("r1")).rev == 1
    await checked.commit(Batch(runs=[run("r1", 1, status="waiting")]))

    stored = await checked.get_run("r1")
    assert (stored.rev, stored.status) == (2, "waiting")
    assert [r.rev for r in await checked.get_runs(["r1"])] == [2]
    assert [r.rev for r in (await checked.list_runs())[0]] == [2]


async def test_a_stale_write_fails_with_stale_and_writes_nothing_of_its_batch(checked):
    await checked.commit(Batch(runs=[run("r1")]))
    await checked.commit(Batch(runs=[run("r1", 1, status="waiting")]))

    with pytest.raises(Stale, match="run r1 was changed by another decision \\(expected revision 1\\)"):
        await checked.commit(Batch(runs=[run("r1", 1, status="failed")], history=[event("r1", 1)]))

    stored = await checked.get_run("r1")
    assert (stored.rev, stored.status) == (2, "waiting")
    assert await checked.history("r1") == []
    assert isinstance(Stale("x"), Conflict)


async def test_a_new_run_must_come_with_rev_0_and_an_existing_one_must_not(checked):
    with pytest.raises(Stale, match="run r1 .*expected revision 3"):
        await checked.commit(Batch(runs=[run("r1", 3)]))
    assert await checked.get_run("r1") is None
    await checked.commit(Batch(runs=[run("r1")]))
    with pytest.raises(Stale, match="expected revision 0"):
        await checked.commit(Batch(runs=[run("r1")]))  # a second start of the same run


async def test_a_stale_batch_fails_alone_and_its_neighbours_in_the_group_commit(checked):
    await checked.commit(Batch(runs=[run("r1"), run("r2")]))
    retried, transactions = checked.stats.retried_groups, checked.stats.transactions

    results = await asyncio.gather(
        checked.commit(Batch(runs=[run("r1", 1, status="succeeded")], history=[event("r1", 1)])),
        checked.commit(Batch(runs=[run("r2", 0, status="failed")], history=[event("r2", 1)])),  # stale
        checked.commit(Batch(runs=[run("r3")])),
        return_exceptions=True,
    )

    assert [type(r) for r in results] == [type(None), Stale, type(None)]
    assert "run r2" in str(results[1]) and results[1].run_id == "r2"
    assert checked.stats.retried_groups == retried + 1  # they were one group, rolled back once
    assert checked.stats.transactions == transactions + 1  # the other two then committed as one
    assert [(r.run_id, r.status, r.rev) for r in await checked.get_runs(["r1", "r2", "r3"])] == [
        ("r1", "succeeded", 2), ("r2", "running", 1), ("r3", "running", 1)]
    assert await checked.history("r2") == [] and len(await checked.history("r1")) == 1


async def test_successive_writes_of_one_run_in_one_group_apply_in_order(checked):
    # PostgreSQL writes them in waves: one statement may not update a row twice
    results = await asyncio.gather(*(checked.commit(Batch(runs=[run("r1", rev, status=f"s{rev}")])) for rev in range(5)))

    assert results == [None] * 5
    assert checked.stats.retried_groups == 0
    stored = await checked.get_run("r1")
    assert (stored.rev, stored.status) == (5, "s4")


async def test_without_check_revs_the_rev_is_counted_but_not_checked(store):
    assert not store.check_revs  # the default, until the runtime passes the revs it read
    await store.commit(Batch(runs=[run("r1")]))
    await store.commit(Batch(runs=[run("r1", status="waiting")]))  # rev 0 again: taken

    assert (await store.get_run("r1")).rev == 2


# -- leases ----------------------------------------------------------------------


async def test_of_many_racing_for_a_free_lease_exactly_one_wins(checked):
    tokens = await asyncio.gather(*(checked.acquire_lease("scheduler", f"replica-{i}", 30) for i in range(20)))

    winners = [i for i, token in enumerate(tokens) if token is not None]
    assert len(winners) == 1 and tokens[winners[0]] == 1
    holder, token, _ = await checked.get_lease("scheduler")
    assert (holder, token) == (f"replica-{winners[0]}", 1)


async def test_a_renewal_keeps_the_token_and_moves_the_expiry(checked):
    assert await checked.acquire_lease("scheduler", "a", 5) == 1
    _, _, first_expiry = await checked.get_lease("scheduler")
    assert await checked.acquire_lease("scheduler", "a", 60) == 1
    assert await checked.acquire_lease("scheduler", "b", 60) is None

    holder, token, expiry = await checked.get_lease("scheduler")
    assert (holder, token) == ("a", 1) and expiry > first_expiry + 50
    assert await checked.get_lease("other") is None


async def test_an_expired_lease_is_taken_over_with_the_next_token(checked):
    assert await checked.acquire_lease("scheduler", "a", 0) == 1  # expires at once
    assert await checked.acquire_lease("scheduler", "b", 60) == 2
    assert await checked.acquire_lease("scheduler", "a", 60) is None
    assert await checked.acquire_lease("scheduler", "b", 60) == 2


async def test_a_fenced_batch_fails_once_its_lease_is_lost_and_writes_nothing(checked):
    token_a = await checked.acquire_lease("scheduler", "a", 60)
    await checked.commit(Batch(runs=[run("r1")], fence=("scheduler", "a", token_a)))
    await checked.acquire_lease("scheduler", "a", 0)  # a renewal that expires at once: a's lease ran out

    token_b = await checked.acquire_lease("scheduler", "b", 60)
    results = await asyncio.gather(
        checked.commit(Batch(runs=[run("r2")], fence=("scheduler", "a", token_a))),  # the old leader
        checked.commit(Batch(runs=[run("r3")], fence=("scheduler", "b", token_b))),
        checked.commit(Batch(runs=[run("r4")], fence=("scheduler", "a", token_b))),  # the right token, wrong holder
        return_exceptions=True,
    )

    assert [type(r) for r in results] == [Fenced, type(None), Fenced]
    assert str(results[0]) == f"lease scheduler is no longer held by a (token {token_a})"
    assert [r.run_id for r in await checked.get_runs(["r1", "r2", "r3", "r4"])] == ["r1", "r3"]


async def test_a_released_lease_is_free_at_once_and_its_token_still_grows(checked):
    await checked.acquire_lease("scheduler", "a", 60)
    await checked.release_lease("scheduler", "b")  # not b's: nothing happens
    assert await checked.acquire_lease("scheduler", "b", 60) is None

    await checked.release_lease("scheduler", "a")
    assert await checked.acquire_lease("scheduler", "b", 60) == 2
    with pytest.raises(Fenced):
        await checked.commit(Batch(runs=[run("r1")], fence=("scheduler", "a", 1)))


async def test_leases_are_listed_by_prefix_with_the_clock_that_judges_them(checked):
    await checked.acquire_lease("replica/a", "a", 60)
    await checked.acquire_lease("replica/b", "b", 0)  # lapsed
    await checked.acquire_lease("replica_c", "c", 60)  # `_` is no wildcard
    await checked.acquire_lease("time", "a", 60)

    listed = await checked.list_leases("replica/")
    assert [(name, holder, token) for name, holder, token, _, _ in listed] == [("replica/a", "a", 1), ("replica/b", "b", 1)]
    (_, _, _, live, now), (_, _, _, lapsed, _) = listed
    assert lapsed <= now < live
    assert len(await checked.list_leases()) == 4


async def test_a_dropped_lease_is_gone_if_its_holder_dropped_it(checked):
    await checked.acquire_lease("replica/a", "a", 60)
    await checked.drop_lease("replica/a", "b")  # not b's
    assert (await checked.get_lease("replica/a"))[0] == "a"

    await checked.drop_lease("replica/a", "a")
    assert await checked.get_lease("replica/a") is None
    assert await checked.list_leases("replica/") == []


async def test_a_shared_secret_is_the_first_one_stored_for_every_caller(checked):
    first = await checked.shared_secret("approval_link_key", "from-r1")
    others = await asyncio.gather(*(checked.shared_secret("approval_link_key", f"from-r{i}") for i in range(2, 6)))
    assert first == "from-r1" and set(others) == {"from-r1"}
    assert await checked.shared_secret("another", "x") == "x"  # each name its own


# -- schedules: the leader's fires and an operator's pause on another replica ----------


SCHEDULE = ScheduleRow("nightly", "report", "h1", 100.0, False, None, None, None, None, None, None, b"[]", 1.0)


def paused(row: ScheduleRow, at: float) -> ScheduleRow:
    return replace(row, paused=True, paused_by="ops", paused_at=at, pause_note="db upgrade", updated_at=at)


async def test_a_fire_written_from_a_row_read_before_a_pause_keeps_the_pause(checked):
    await checked.commit(Batch(schedules=[SCHEDULE]))
    await checked.commit(Batch(schedule_pauses=[paused(SCHEDULE, 5.0)]))  # on a follower
    # the leader read the row before the pause, and fires: before, its row undid the pause
    await checked.commit(Batch(schedules=[replace(SCHEDULE, next_at=200.0, last_fire_at=100.0,
                                                  last_outcome="started", updated_at=6.0)]))

    [row] = await checked.list_schedules()
    assert (row.paused, row.paused_by, row.paused_at, row.pause_note) == (True, "ops", 5.0, "db upgrade")
    assert (row.next_at, row.last_fire_at, row.last_outcome) == (200.0, 100.0, "started")


async def test_a_pause_written_from_a_row_read_before_a_fire_keeps_the_fire(checked):
    await checked.commit(Batch(schedules=[SCHEDULE]))
    await checked.commit(Batch(schedules=[replace(SCHEDULE, next_at=200.0, last_fire_at=100.0, updated_at=6.0)]))
    await checked.commit(Batch(schedule_pauses=[paused(SCHEDULE, 7.0)]))  # from the row before the fire

    [row] = await checked.list_schedules()
    assert (row.paused, row.next_at, row.last_fire_at, row.updated_at) == (True, 200.0, 100.0, 7.0)

    # a resume writes its next_at (the first fire after now); a new schedule's row is written whole
    await checked.commit(Batch(schedule_pauses=[replace(SCHEDULE, next_at=300.0, updated_at=8.0)]))
    await checked.commit(Batch(schedules=[replace(SCHEDULE, name="weekly", paused=True, paused_by="ops")]))
    rows = {r.name: r for r in await checked.list_schedules()}
    assert (rows["nightly"].paused, rows["nightly"].paused_by, rows["nightly"].next_at) == (False, None, 300.0)
    assert (rows["weekly"].paused, rows["weekly"].paused_by) == (True, "ops")


def test_in_one_group_a_fire_after_a_resume_keeps_the_fires_next_at():
    resume = replace(SCHEDULE, next_at=300.0, updated_at=8.0)
    fire = replace(SCHEDULE, next_at=400.0, last_fire_at=300.0, updated_at=9.0)
    plan = dict(make_plan([Batch(schedule_pauses=[resume]), Batch(schedules=[fire])]).statements)
    # the statements run schedules first, then pauses: the resume's next_at must not win
    assert plan["schedule_pauses"] == [(False, None, None, None, None, 8.0, "nightly")]
    assert plan["schedules"][0][3] == 400.0

    again = dict(make_plan([Batch(schedule_pauses=[resume]), Batch(schedule_pauses=[paused(SCHEDULE, 9.0)])]).statements)
    assert again["schedule_pauses"] == [(True, "ops", 9.0, "db upgrade", 300.0, 9.0, "nightly")]


# -- PostgreSQL's own ----------------------------------------------------------------


async def schema_versions(url: str) -> list[int]:
    conn = await asyncpg.connect(url)
    try:
        return [row[0] for row in await conn.fetch("SELECT version FROM baton_schema")]
    finally:
        await conn.close()


async def test_replicas_opening_one_empty_database_at_once_migrate_it_once(postgres_url):
    stores = [PostgresStore(postgres_url) for _ in range(3)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        await stores[0].commit(Batch(runs=[run("r1")]))
        assert [r.run_id for r in (await stores[2].list_runs())[0]] == ["r1"]
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    latest = len(migrations("server.store.migrations.postgres"))
    assert latest >= 2 and await schema_versions(postgres_url) == [latest]

    again = PostgresStore(postgres_url)  # a current schema: opens without migrating
    await again.open()
    await again.close()
    assert await schema_versions(postgres_url) == [latest]


async def lock_waiters(conn: asyncpg.Connection) -> int:
    return await conn.fetchval("SELECT count(*) FROM pg_stat_activity"
                               " WHERE datname = current_database() AND wait_event_type = 'Lock'")


async def until_lock_waiters(conn: asyncpg.Connection, count: int) -> None:
    async with asyncio.timeout(10):
        while await lock_waiters(conn) < count:
            await asyncio.sleep(0.01)


async def test_replicas_writing_the_same_runs_in_opposite_orders_do_not_deadlock(postgres_url):
    # Two replicas' group commits share runs a and b, in opposite orders. A third
    # connection holds a, so both wait; once it lets go, a writer taking rows in the
    # batch's order would hold b and wait for a while the other holds a and waits for
    # b: PostgreSQL aborted one ("deadlock detected"), and its results waited for a
    # redelivery. Each commit locks its runs by id first.
    one, two = PostgresStore(postgres_url), PostgresStore(postgres_url)
    await one.open()
    await two.open()
    blocker = await asyncpg.connect(postgres_url)
    try:
        await one.commit(Batch(runs=[run("a"), run("b")]))
        holding = blocker.transaction()
        await holding.start()
        await blocker.execute("SELECT 1 FROM runs WHERE run_id = 'a' FOR UPDATE")
        first = asyncio.create_task(one.commit(Batch(runs=[run("a", 1, status="waiting"), run("b", 1, status="waiting")])))
        await until_lock_waiters(blocker, 1)
        second = asyncio.create_task(two.commit(Batch(runs=[run("b", 1, status="failed"), run("a", 1, status="failed")])))
        await until_lock_waiters(blocker, 2)
        await holding.rollback()
        await asyncio.wait_for(asyncio.gather(first, second), 10)
    finally:
        await blocker.close()
        await asyncio.gather(one.close(), two.close())
    check = PostgresStore(postgres_url)
    await check.open()
    try:
        # both written, in the order they came: a rev for the start and one for each commit
        assert {(r.run_id, r.status, r.rev) for r in await check.get_runs(["a", "b"])} == {
            ("a", "failed", 3), ("b", "failed", 3)}
    finally:
        await check.close()


async def test_a_schema_newer_than_the_code_is_refused(postgres_url):
    s = PostgresStore(postgres_url)
    await s.open()
    await s.close()
    conn = await asyncpg.connect(postgres_url)
    await conn.execute("UPDATE baton_schema SET version = 999")
    await conn.close()

    with pytest.raises(StoreError, match="schema is version 999, newer than this Baton knows"):
        await PostgresStore(postgres_url).open()


@pytest.mark.parametrize("url, words", [
    ("postgresql://baton:hunter2@localhost:notaport/baton", "invalid PostgreSQL URL"),
    ("mysql://baton:hunter2@localhost/baton", "the scheme must be one of postgresql, postgres"),
])
def test_a_bad_url_is_a_clear_store_error_without_the_password(url: str, words: str):
    with pytest.raises(StoreError, match=words) as caught:
        PostgresStore(url)
    assert "hunter2" not in str(caught.value)


async def test_an_unreachable_server_is_a_store_error_naming_it_without_the_password():
    with pytest.raises(StoreError) as caught:
        await PostgresStore("postgresql://baton:hunter2@127.0.0.1:1/baton").open()  # nothing listens on port 1

    message = str(caught.value)
    assert "cannot reach the database postgresql://baton@127.0.0.1:1/baton" in message
    assert "hunter2" not in message


async def test_a_missing_database_is_a_store_error_that_says_so(postgres_url):
    with pytest.raises(StoreError, match="the database does not exist"):
        await PostgresStore(postgres_url.replace("/baton_test_", "/missing_")).open()


def test_the_db_setting_picks_the_store_and_its_log_line_hides_the_password(tmp_path, monkeypatch):
    monkeypatch.delenv("BATON_DB", raising=False)  # the default, whatever the suite runs on
    url = "postgresql://baton:hunter2@db.internal:5432/baton"
    on_postgres = Settings(db=url)
    assert isinstance(make_store(on_postgres), PostgresStore)
    assert on_postgres.db_display == "postgresql://baton:***@db.internal:5432/baton"
    assert Settings(db="postgres://db.internal/baton").db_display == "postgres://db.internal/baton"

    on_sqlite = Settings(data_dir=tmp_path)
    assert isinstance(make_store(on_sqlite), SQLiteStore)
    assert on_sqlite.db_display == str(tmp_path / "baton.db")


async def test_times_round_trip_exactly(store):
    odd = replace(run("r1"), created_at=1712345678.123456789, updated_at=0.1 + 0.2)
    await store.commit(Batch(runs=[odd]))

    stored = await store.get_run("r1")
    assert (stored.created_at, stored.updated_at) == (odd.created_at, odd.updated_at)
