"""The PostgreSQL store (asyncpg): the rules of server.store.base on a database that
several Baton replicas can share.

It is shaped like the SQLite store, for the same reasons:

* `commit()` only enqueues; one writer task takes everything queued (up to
  `MAX_GROUP_BATCHES`) and writes it as one transaction, one statement per table
  and statement kind (`make_plan`), then resolves every caller's future. A commit
  costs a round trip and a WAL flush on the server; a group pays them once.
* A group that fails because of one batch's data (a constraint, a value PostgreSQL
  cannot take, a stale run revision, a lost lease) is rolled back and retried one
  transaction per batch, so only the offender fails. A failure of the database
  itself (unreachable, disk full, shut down) fails the whole group with StoreError.
* Reads and leases use other connections of the pool, so they never wait behind a
  group commit. The writer holds one pool connection; after a database failure it
  gives it back, and the next group takes a fresh one.

What differs:

* Runs are written with `unnest` and `RETURNING run_id`: the rows a revision check
  refused are the ones missing from the answer, which names the stale run. One
  statement cannot update a row twice, so a group that writes one run several
  times writes it in waves, one row per run per wave, in commit order.
* Lease expiry is judged by the database's clock (`clock_timestamp()`), so replicas
  with skewed clocks agree on who holds a lease; a fenced batch reads its lease
  `FOR SHARE`, which holds off a takeover until the batch committed.
* Migrations run under a transaction-scoped advisory lock: replicas starting
  together migrate once. The version is the one row of `baton_schema`.

asyncpg exceptions become `Conflict` / `StoreError` in `map_error`, here only; no
message names the password.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg

from server.errors import BadRequest, BatonError, Conflict, Fenced, Stale, StoreError
from server.store.base import (
    RESUMABLE,
    TERMINAL,
    ApprovalRow,
    AuditRow,
    Batch,
    DeadLetterRow,
    DefinitionRow,
    EventRow,
    HistoryRow,
    OutboxRow,
    RunRow,
    ScheduleFireRow,
    ScheduleRow,
    StepRow,
    TimerRow,
    decode_cursor,
    encode_cursor,
)
from server.store.batching import (
    APPROVAL_COLUMNS,
    AUDIT_COLUMNS,
    DEAD_LETTER_COLUMNS,
    DEFINITION_COLUMNS,
    EVENT_COLUMNS,
    HISTORY_COLUMNS,
    OUTBOX_COLUMNS,
    RUN_COLUMNS,
    SCHEDULE_COLUMNS,
    SCHEDULE_FIRE_COLUMNS,
    SCHEDULE_UPDATE_COLUMNS,
    STEP_COLUMNS,
    STOP,
    TIMER_COLUMNS,
    GroupWriter,
    Pending,
    Plan,
    StoreStats,
    make_plan,
    migrations,
)

# The writer's connection plus readers; API reads are short.
POOL_MAX_SIZE = 8
CONNECT_TIMEOUT_S = 10.0
# pg_advisory_xact_lock key for migrations: any constant every replica shares ("BATON" in ASCII).
MIGRATION_LOCK = 0x424154_4F4E
SCHEMES = ("postgresql", "postgres")

_TERMINAL_SQL = ", ".join(f"'{s}'" for s in TERMINAL)
_RESUMABLE_SQL = ", ".join(f"'{s}'" for s in RESUMABLE)
_NOW = "extract(epoch FROM clock_timestamp())::double precision"

# -- SQL -----------------------------------------------------------------------


def _placeholders(count: int, start: int = 1) -> str:
    return ", ".join(f"${i}" for i in range(start, start + count))


_RUN_TYPES = "text, text, text, text, text, text, float8, float8, float8, int8, bytea, int8"
_RUN_INPUT = (
    "unnest(" + ", ".join(f"${i}::{t.strip()}[]" for i, t in enumerate(_RUN_TYPES.split(","), 1)) + ")"
    f" AS i({RUN_COLUMNS})"
)
_RUN_VALUES = "i.run_id, i.workflow, i.version, i.def_hash, i.workflow_id, i.status, i.created_at, i.updated_at," \
    " i.finished_at, i.inflight, i.data, i.rev + 1"
# Identity columns are written once (see the SQLite store); the stored rev becomes the rev read + 1.
_RUN_UPDATE = """status = excluded.status, updated_at = excluded.updated_at, finished_at = excluded.finished_at,
    inflight = excluded.inflight, data = excluded.data"""
_UPSERT_RUNS = f"""
INSERT INTO runs ({RUN_COLUMNS}) SELECT {_RUN_VALUES} FROM {_RUN_INPUT}
ON CONFLICT (run_id) DO UPDATE SET {_RUN_UPDATE}, rev = runs.rev + 1
RETURNING run_id
"""
_UPSERT_RUNS_CHECKED = f"""
INSERT INTO runs ({RUN_COLUMNS}) SELECT {_RUN_VALUES} FROM {_RUN_INPUT}
    WHERE i.rev = 0 OR EXISTS (SELECT 1 FROM runs r WHERE r.run_id = i.run_id)
ON CONFLICT (run_id) DO UPDATE SET {_RUN_UPDATE}, rev = excluded.rev
    WHERE runs.rev = excluded.rev - 1
RETURNING run_id
"""


def _insert_with_id(table: str, columns: str) -> str:
    """An insert whose first column is an id the store assigns when the row has none."""
    count = len(columns.split(","))
    return (f"INSERT INTO {table} ({columns}) VALUES"
            f" (COALESCE($1::bigint, nextval(pg_get_serial_sequence('{table}', 'id'))), {_placeholders(count - 1, 2)})")


# The statement of each plan kind but runs, run with executemany (asyncpg pipelines it).
_SQL = {
    "steps_deleted": "DELETE FROM steps WHERE run_id = $1 AND key = $2",
    "timers_deleted": "DELETE FROM timers WHERE run_id = $1 AND timer_id = $2",
    "steps": f"""INSERT INTO steps ({STEP_COLUMNS}) VALUES ({_placeholders(8)})
        ON CONFLICT (run_id, key) DO UPDATE SET step_id = excluded.step_id, status = excluded.status,
        attempt = excluded.attempt, started_at = excluded.started_at, finished_at = excluded.finished_at,
        data = excluded.data""",
    "history": f"INSERT INTO history ({HISTORY_COLUMNS}) VALUES ({_placeholders(6)})",
    "timers": f"""INSERT INTO timers ({TIMER_COLUMNS}) VALUES ($1, $2, $3)
        ON CONFLICT (run_id, timer_id) DO UPDATE SET fire_at = excluded.fire_at""",
    "definitions": f"INSERT INTO definitions ({DEFINITION_COLUMNS}) VALUES ({_placeholders(5)}) ON CONFLICT DO NOTHING",
    "outbox": _insert_with_id("outbox", OUTBOX_COLUMNS),
    "outbox_deleted": "DELETE FROM outbox WHERE id = $1",
    "events_pruned": "DELETE FROM events WHERE received_at < $1",
    "events": f"INSERT INTO events ({EVENT_COLUMNS}) VALUES ({_placeholders(5)}) ON CONFLICT DO NOTHING",
    "dead_letters": _insert_with_id("dead_letters", DEAD_LETTER_COLUMNS),
    "dead_letters_replayed": "UPDATE dead_letters SET replayed_at = $1, replay_run = $2 WHERE id = $3",
    "approvals": f"INSERT INTO approvals ({APPROVAL_COLUMNS}) VALUES ({_placeholders(12)}) ON CONFLICT DO NOTHING",
    # Only a pending request closes: a decision can never overwrite another one.
    "approvals_closed": "UPDATE approvals SET status = $1, decided_at = $2, decided_by = $3, decided_via = $4,"
                        " comment = $5 WHERE id = $6 AND status = 'pending'",
    "audit": _insert_with_id("audit", AUDIT_COLUMNS),
    "schedules": f"INSERT INTO schedules ({SCHEDULE_COLUMNS}) VALUES ({_placeholders(13)}) ON CONFLICT (name)"
                 " DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in SCHEDULE_UPDATE_COLUMNS),
    "schedule_pauses": "UPDATE schedules SET paused = $1, paused_by = $2, paused_at = $3, pause_note = $4,"
                       " next_at = COALESCE($5, next_at), updated_at = $6 WHERE name = $7",
    "schedule_fires": _insert_with_id("schedule_fires", SCHEDULE_FIRE_COLUMNS),
    "schedule_fires_pruned": "DELETE FROM schedule_fires WHERE schedule = $1 AND id <= (SELECT id FROM schedule_fires"
                             " WHERE schedule = $1 ORDER BY id DESC LIMIT 1 OFFSET $2)",
}


def _bools(*positions: int) -> Callable[[tuple], tuple]:
    """SQLite takes 0/1 for a flag, a PostgreSQL BOOLEAN only a bool."""
    return lambda row: tuple(bool(v) if i in positions else v for i, v in enumerate(row))


_CONVERT = {"schedules": _bools(4), "schedule_pauses": _bools(0), "schedule_fires": _bools(7, 8)}

# Replicas commit groups of runs at once; each writer locks its runs in one order (by id)
# before writing any of their rows, or two groups that share runs deadlock (PostgreSQL
# then aborts one, and its results wait for a redelivery). FOR NO KEY UPDATE: what the
# upsert takes anyway.
_LOCK_RUNS = "SELECT 1 FROM runs WHERE run_id = ANY($1::text[]) ORDER BY run_id FOR NO KEY UPDATE"
# the plan kinds whose first parameter is a run id
_RUN_KINDS = ("runs", "steps_deleted", "timers_deleted", "steps", "timers")
_HOLDS_LEASE = f"SELECT 1 FROM leases WHERE name = $1 AND holder = $2 AND token = $3 AND expires_at > {_NOW} FOR SHARE"
# One statement: of racing callers for a free lease exactly one inserts or updates it.
_ACQUIRE_LEASE = f"""
INSERT INTO leases (name, holder, token, expires_at) VALUES ($1, $2, 1, {_NOW} + $3)
ON CONFLICT (name) DO UPDATE SET
    token = CASE WHEN leases.holder = excluded.holder THEN leases.token ELSE leases.token + 1 END,
    holder = excluded.holder, expires_at = excluded.expires_at
WHERE leases.holder = excluded.holder OR leases.expires_at <= {_NOW}
RETURNING token
"""
# Expired rather than deleted: the token stays, so the next holder's is still larger.
_RELEASE_LEASE = f"UPDATE leases SET expires_at = least(expires_at, {_NOW}) WHERE name = $1 AND holder = $2"


# -- where the database is, without the password --------------------------------


def describe_url(url: str) -> str:
    """postgresql://user@host:port/db of a URL (no password), or StoreError if it is not one."""
    try:
        parts = urlsplit(url)
        port = parts.port  # a port that is not a number raises here
    except ValueError as exc:
        raise StoreError(f"invalid PostgreSQL URL: {exc}") from None
    if parts.scheme not in SCHEMES:
        raise StoreError(f"invalid PostgreSQL URL: the scheme must be one of {', '.join(SCHEMES)}")
    query = parse_qs(parts.query)
    host = parts.hostname or query.get("host", ["localhost"])[0]
    user = parts.username or query.get("user", [""])[0]
    database = parts.path.lstrip("/") or query.get("dbname", [user])[0]
    return f"postgresql://{user + '@' if user else ''}{host}{f':{port}' if port else ''}/{database}"


def _scrub(text: str, url: str) -> str:
    password = urlsplit(url).password
    return text.replace(password, "***") if password else text


# -- error mapping -------------------------------------------------------------

# Constraints the API will meet, in words (the same as SQLite's); others name the constraint.
_CONFLICT_MESSAGES = {
    "runs_open_workflow_id": "an open run of this workflow already has this workflow_id",
    "history_pkey": "this history entry (run_id, seq) is already recorded",
}
# What the operator should know, by SQLSTATE (longest prefix first).
_ERROR_MESSAGES = {
    "53100": "the database server's disk is full",
    "53": "the database server is out of resources",
    "57P01": "the database server is shutting down",
    "57P": "the database server is not accepting commands",
    "57": "the database server stopped the statement",
    "28P01": "password authentication failed",
    "28": "the database refused the login",
    "3D000": "the database does not exist",
    "25006": "the database is read-only (a standby?)",
    "08": "the connection to the database failed",
    "42": "the database schema is not what Baton expects",
    "XX": "the database server reported an internal error (corruption?)",
}
# Errors caused by one batch's data rather than by the database: retry one by one.
_BATCH_ERRORS = (
    Stale,
    Fenced,
    asyncpg.IntegrityConstraintViolationError,  # SQLSTATE 23
    asyncpg.DataError,  # SQLSTATE 22: a value the server cannot take
    asyncpg.exceptions._base.DataError,  # a value asyncpg cannot encode
)
_DATABASE_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, asyncio.TimeoutError, BatonError)


def map_error(exc: BaseException, where: str, url: str = "") -> BatonError:
    """Conflict for a unique violation, StoreError for any other database failure."""
    if isinstance(exc, BatonError):
        return exc
    if isinstance(exc, asyncpg.UniqueViolationError):
        name = exc.constraint_name or ""
        error: BatonError = Conflict(_CONFLICT_MESSAGES.get(name, f"already recorded: {name or exc}"))
    elif isinstance(exc, asyncpg.PostgresError):
        code = exc.sqlstate or ""
        what = next((m for prefix, m in _ERROR_MESSAGES.items() if code.startswith(prefix)), "PostgreSQL error")
        error = StoreError(_scrub(f"{what}: {where}: {exc} (SQLSTATE {code})", url))
    elif isinstance(exc, _BATCH_ERRORS) or not isinstance(exc, _DATABASE_ERRORS):
        error = StoreError(f"PostgreSQL cannot take this value: {where}: {exc} ({type(exc).__name__})")
    else:
        text = str(exc) or type(exc).__name__
        error = StoreError(_scrub(f"cannot reach the database {where}: {text}", url))
    error.__cause__ = exc
    return error


def _is_batch_error(exc: BaseException) -> bool:
    # Anything not from the database (an int too large, a row of the wrong type) comes from the data.
    return isinstance(exc, _BATCH_ERRORS) or not isinstance(exc, _DATABASE_ERRORS)


# -- the store -----------------------------------------------------------------


class PostgresStore(GroupWriter):
    """The Store on a PostgreSQL database (URL postgresql://...). `stats` counts what the writer did."""

    def __init__(self, url: str, *, check_revs: bool = False, pool_max_size: int = POOL_MAX_SIZE) -> None:
        self.url = url
        self.where = describe_url(url)  # also refuses a URL that is not PostgreSQL's
        self.check_revs = check_revs
        self.pool_max_size = pool_max_size
        self.stats = StoreStats()
        self._pool: asyncpg.Pool | None = None
        self._conn: asyncpg.Connection | None = None  # the writer's, acquired from the pool
        self._queue: asyncio.Queue[Pending | object] | None = None
        self._writer: asyncio.Task[None] | None = None
        # told (batches, seconds) of each group committed in one transaction (metrics)
        self.on_group: Callable[[int, float], None] | None = None

    # -- lifetime --

    async def open(self) -> None:
        if self._writer is not None:
            raise RuntimeError("the store is already open")
        try:
            self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=self.pool_max_size,
                                                   timeout=CONNECT_TIMEOUT_S)
            async with self._pool.acquire() as conn:
                await self._migrate(conn)
        except BaseException as exc:
            await self._release()
            if isinstance(exc, Exception):
                raise map_error(exc, self.where, self.url) from None  # the driver's text may hold the URL
            raise
        self._queue = asyncio.Queue()
        self._writer = asyncio.create_task(self._write_loop(self._queue), name=f"baton-store-writer {self.where}")

    async def _migrate(self, conn: asyncpg.Connection) -> None:
        """Bring the schema to the latest version, in one transaction. Writes nothing when current."""
        scripts = migrations("server.store.migrations.postgres")
        latest = len(scripts)
        if await self._version(conn) == latest:
            return  # so a read-only standby still opens
        async with conn.transaction():
            # Replicas starting together: one migrates, the others wait here and find it done.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute("CREATE TABLE IF NOT EXISTS baton_schema (version integer NOT NULL)")
            current = await self._version(conn)
            if current > latest:
                raise StoreError(f"the database schema is version {current}, newer than this Baton knows"
                                 f" ({latest}); upgrade Baton: {self.where}")
            for _, script in scripts[current:]:
                await conn.execute(script)
            if current < latest:
                await conn.execute("DELETE FROM baton_schema")
                await conn.execute("INSERT INTO baton_schema (version) VALUES ($1)", latest)

    @staticmethod
    async def _version(conn: asyncpg.Connection) -> int:
        if await conn.fetchval("SELECT to_regclass('baton_schema')") is None:
            return 0
        return await conn.fetchval("SELECT coalesce(max(version), 0) FROM baton_schema")

    async def close(self) -> None:
        """Write what was committed before the call, then close the connections."""
        writer, self._writer = self._writer, None
        if writer is not None:
            assert self._queue is not None
            self._queue.put_nowait(STOP)
            await asyncio.wait([writer])  # if it was cancelled instead, its callers were told
        await self._release()

    async def _release(self) -> None:
        pool, self._pool = self._pool, None
        conn, self._conn = self._conn, None
        if pool is not None:
            if conn is not None:
                await pool.release(conn)
            await pool.close()

    # -- writing --

    async def _transaction(self, items: Iterable[Batch | DefinitionRow]) -> None:
        plan = make_plan(items, self.check_revs)
        if not (plan.statements or plan.fences):
            return
        conn = await self._writer_connection()
        try:
            async with conn.transaction():
                await _apply(conn, plan)
        except Exception as exc:
            if not _is_batch_error(exc):  # the connection may be broken: the next group takes a new one
                self._conn = None
                await self._pool.release(conn)  # type: ignore[union-attr]
            raise

    async def _writer_connection(self) -> asyncpg.Connection:
        """The writer's own connection, held between groups: releasing it to the pool
        after each group would cost a reset round trip per commit."""
        if self._pool is None:
            raise StoreError(f"the store is not open: {self.where}")
        if self._conn is None or self._conn.is_closed():
            self._conn = await self._pool.acquire()
        return self._conn

    def _is_batch_error(self, exc: BaseException) -> bool:
        return _is_batch_error(exc)

    def _caller_error(self, exc: BaseException) -> BaseException:
        return map_error(exc, self.where, self.url)

    # -- leases --

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> int | None:
        return await self._call("fetchval", _ACQUIRE_LEASE, name, holder, float(ttl_s))

    async def release_lease(self, name: str, holder: str) -> None:
        await self._call("execute", _RELEASE_LEASE, name, holder)

    async def get_lease(self, name: str) -> tuple[str, int, float] | None:
        row = await self._call("fetchrow", "SELECT holder, token, expires_at FROM leases WHERE name = $1", name)
        return None if row is None else tuple(row)  # type: ignore[return-value]

    async def list_leases(self, prefix: str = "") -> list[tuple[str, str, int, float, float]]:
        sql = (f"SELECT name, holder, token, expires_at, {_NOW} FROM leases"
               " WHERE left(name, length($1)) = $1 ORDER BY name")  # not LIKE: a prefix may hold % or _
        return [tuple(row) for row in await self._fetch(sql, prefix)]  # type: ignore[misc]

    async def drop_lease(self, name: str, holder: str) -> None:
        await self._call("execute", "DELETE FROM leases WHERE name = $1 AND holder = $2", name, holder)

    async def shared_secret(self, name: str, candidate: str) -> str:
        await self._call("execute", "INSERT INTO secrets (name, value) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                         name, candidate)
        return await self._call("fetchval", "SELECT value FROM secrets WHERE name = $1", name)

    # -- reading --

    async def _call(self, method: str, sql: str, *args: Any) -> Any:
        if self._pool is None:
            raise StoreError(f"the store is not open: {self.where}")
        try:
            return await getattr(self._pool, method)(sql, *args)
        except Exception as exc:
            raise map_error(exc, self.where, self.url) from None

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self._call("fetch", sql, *args)

    async def get_run(self, run_id: str) -> RunRow | None:
        rows = await self._fetch(f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = $1", run_id)
        return RunRow(*rows[0]) if rows else None

    async def get_runs(self, run_ids: list[str]) -> list[RunRow]:
        sql = f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ANY($1::text[])"
        found = {row[0]: RunRow(*row) for row in await self._fetch(sql, list(set(run_ids)))}
        return [found[run_id] for run_id in run_ids if run_id in found]

    async def get_steps(self, run_id: str) -> list[StepRow]:
        sql = f"SELECT {STEP_COLUMNS} FROM steps WHERE run_id = $1 ORDER BY ord"
        return [StepRow(*row) for row in await self._fetch(sql, run_id)]

    async def list_runs(
        self,
        *,
        workflow: str | None = None,
        status: str | None = None,
        workflow_id: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[RunRow], str | None]:
        return await self._page(RunRow, "runs", RUN_COLUMNS, ("created_at", "run_id"), limit, cursor, (
            ("workflow = {}", workflow), ("status = {}", status), ("workflow_id = {}", workflow_id),
            ("created_at >= {}", since), ("created_at < {}", until),
        ))

    async def _page(self, row_type: Callable[..., Any], table: str, columns: str, key: tuple[str, str], limit: int,
                    cursor: str | None, terms: tuple[tuple[str, Any], ...]) -> tuple[list[Any], str | None]:
        """A keyset page, newest first by `key` (a time and an id), with the cursor of the next."""
        if limit < 1:
            raise BadRequest(f"limit must be at least 1, not {limit}", field="limit")
        when, ident = key
        where, params = _where(*terms, (f"({when}, {ident}) < ({{}}, {{}})",
                                        None if cursor is None else decode_cursor(cursor)))
        sql = f"SELECT {columns} FROM {table}{where} ORDER BY {when} DESC, {ident} DESC LIMIT ${len(params) + 1}"
        rows = [row_type(*row) for row in await self._fetch(sql, *params, limit + 1)]
        if len(rows) <= limit:
            return rows, None
        del rows[limit:]
        return rows, encode_cursor(getattr(rows[-1], when), getattr(rows[-1], ident))

    async def history(self, run_id: str, *, after_seq: int = 0, limit: int = 1000) -> list[HistoryRow]:
        sql = f"SELECT {HISTORY_COLUMNS} FROM history WHERE run_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        return [HistoryRow(*row) for row in await self._fetch(sql, run_id, after_seq, limit)]

    async def recoverable_runs(self) -> list[RunRow]:
        # The status term repeats the WHERE of the partial index runs_open.
        sql = (f"SELECT {RUN_COLUMNS} FROM runs WHERE status NOT IN ({_TERMINAL_SQL})"
               f" AND (inflight > 0 OR status IN ({_RESUMABLE_SQL})) ORDER BY created_at, run_id")
        return [RunRow(*row) for row in await self._fetch(sql)]

    async def find_open_run(self, workflow: str, workflow_id: str) -> RunRow | None:
        sql = (f"SELECT {RUN_COLUMNS} FROM runs"
               f" WHERE workflow = $1 AND workflow_id = $2 AND status NOT IN ({_TERMINAL_SQL})")
        rows = await self._fetch(sql, workflow, workflow_id)
        return RunRow(*rows[0]) if rows else None

    async def due_timers(self, until: float, limit: int) -> list[TimerRow]:
        sql = f"SELECT {TIMER_COLUMNS} FROM timers WHERE fire_at <= $1 ORDER BY fire_at, run_id, timer_id LIMIT $2"
        return [TimerRow(*row) for row in await self._fetch(sql, until, limit)]

    async def next_timer_at(self) -> float | None:
        return await self._call("fetchval", "SELECT min(fire_at) FROM timers")

    async def count_timers(self) -> int:
        return await self._call("fetchval", "SELECT count(*) FROM timers")

    async def open_run_counts(self) -> list[tuple[str, str, int]]:
        sql = f"SELECT workflow, status, count(*) FROM runs WHERE status NOT IN ({_TERMINAL_SQL}) GROUP BY workflow, status"
        return [tuple(row) for row in await self._fetch(sql)]  # type: ignore[misc]

    async def waiting_step_counts(self) -> list[tuple[str, str, int]]:
        sql = ("SELECT r.def_hash, s.step_id, count(*) FROM runs r JOIN steps s ON s.run_id = r.run_id"
               f" WHERE r.status NOT IN ({_TERMINAL_SQL}) AND s.status = 'waiting' GROUP BY r.def_hash, s.step_id")
        return [tuple(row) for row in await self._fetch(sql)]  # type: ignore[misc]

    async def get_definition(self, def_hash: str) -> DefinitionRow | None:
        rows = await self._fetch(f"SELECT {DEFINITION_COLUMNS} FROM definitions WHERE def_hash = $1", def_hash)
        return DefinitionRow(*rows[0]) if rows else None

    async def list_definitions(self, name: str | None = None) -> list[DefinitionRow]:
        where, params = _where(("name = {}", name))
        sql = f"SELECT {DEFINITION_COLUMNS} FROM definitions{where} ORDER BY name, created_at, def_hash"
        return [DefinitionRow(*row) for row in await self._fetch(sql, *params)]

    async def get_event(self, event_key: str) -> EventRow | None:
        rows = await self._fetch(f"SELECT {EVENT_COLUMNS} FROM events WHERE event_key = $1", event_key)
        return EventRow(*rows[0]) if rows else None

    async def list_dead_letters(self, *, limit: int = 50, before_id: int | None = None) -> list[DeadLetterRow]:
        if limit < 1:
            raise BadRequest(f"limit must be at least 1, not {limit}", field="limit")
        where, params = _where(("id < {}", before_id))
        sql = f"SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters{where} ORDER BY id DESC LIMIT ${len(params) + 1}"
        return [DeadLetterRow(*row) for row in await self._fetch(sql, *params, limit)]

    async def get_dead_letter(self, id: int) -> DeadLetterRow | None:
        rows = await self._fetch(f"SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE id = $1", id)
        return DeadLetterRow(*rows[0]) if rows else None

    async def outbox_pending(self, limit: int, after_id: int = 0) -> list[OutboxRow]:
        sql = f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE id > $1 ORDER BY id LIMIT $2"
        return [OutboxRow(*row) for row in await self._fetch(sql, after_id, limit)]

    async def outbox_rows(self, ids: list[int]) -> list[OutboxRow]:
        sql = f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE id = ANY($1::bigint[]) ORDER BY id"
        return [OutboxRow(*row) for row in await self._fetch(sql, ids)]

    async def list_audit(
        self,
        *,
        limit: int = 50,
        before_id: int | None = None,
        since: float | None = None,
        until: float | None = None,
        actor: str | None = None,
        action: str | None = None,
    ) -> list[AuditRow]:
        if limit < 1:
            raise BadRequest(f"limit must be at least 1, not {limit}", field="limit")
        where, params = _where(("id < {}", before_id), ("at >= {}", since), ("at < {}", until),
                               ("actor = {}", actor), ("action = {}", action))
        sql = f"SELECT {AUDIT_COLUMNS} FROM audit{where} ORDER BY id DESC LIMIT ${len(params) + 1}"
        return [AuditRow(*row) for row in await self._fetch(sql, *params, limit)]

    async def list_schedules(self) -> list[ScheduleRow]:
        return [ScheduleRow(*row) for row in await self._fetch(f"SELECT {SCHEDULE_COLUMNS} FROM schedules ORDER BY name")]

    async def list_schedule_fires(self, schedule: str, *, limit: int = 50,
                                  before_id: int | None = None) -> list[ScheduleFireRow]:
        if limit < 1:
            raise BadRequest(f"limit must be at least 1, not {limit}", field="limit")
        where, params = _where(("schedule = {}", schedule), ("id < {}", before_id))
        sql = f"SELECT {SCHEDULE_FIRE_COLUMNS} FROM schedule_fires{where} ORDER BY id DESC LIMIT ${len(params) + 1}"
        return [ScheduleFireRow(*row) for row in await self._fetch(sql, *params, limit)]

    async def iter_runs(
        self,
        *,
        workflow: str | None = None,
        status: str | None = None,
        since: float | None = None,
        until: float | None = None,
        page_size: int = 500,
    ) -> AsyncIterator[list[RunRow]]:
        if page_size < 1:
            raise BadRequest(f"page size must be at least 1, not {page_size}", field="page_size")
        after: tuple[float, str] | None = None
        while True:  # keyset: each page starts just past the last row of the previous one
            where, params = _where(("workflow = {}", workflow), ("status = {}", status), ("created_at >= {}", since),
                                   ("created_at < {}", until), ("(created_at, run_id) > ({}, {})", after))
            sql = f"SELECT {RUN_COLUMNS} FROM runs{where} ORDER BY created_at, run_id LIMIT ${len(params) + 1}"
            page = [RunRow(*row) for row in await self._fetch(sql, *params, page_size)]
            if page:
                yield page
            if len(page) < page_size:
                return
            after = (page[-1].created_at, page[-1].run_id)

    async def iter_history(self, run_ids: list[str], *, types: tuple[str, ...] | None = None,
                           page_size: int = 5000) -> AsyncIterator[list[HistoryRow]]:
        if page_size < 1:
            raise BadRequest(f"page size must be at least 1, not {page_size}", field="page_size")
        unique = sorted(set(run_ids))
        after: tuple[str, int] = ("", 0)
        while True:
            where, params = _where(("run_id = ANY({}::text[])", unique), ("type = ANY({}::text[])", list(types or ()) or None),
                                   ("(run_id, seq) > ({}, {})", after))
            sql = f"SELECT {HISTORY_COLUMNS} FROM history{where} ORDER BY run_id, seq LIMIT ${len(params) + 1}"
            page = [HistoryRow(*row) for row in await self._fetch(sql, *params, page_size)]
            if page:
                yield page
            if len(page) < page_size:
                return
            after = (page[-1].run_id, page[-1].seq)

    async def steps_of(self, run_ids: list[str]) -> list[StepRow]:
        sql = f"SELECT {STEP_COLUMNS} FROM steps WHERE run_id = ANY($1::text[]) ORDER BY run_id, ord"
        return [StepRow(*row) for row in await self._fetch(sql, list(set(run_ids)))]

    async def first_history(self, run_ids: list[str], type_: str) -> dict[str, HistoryRow]:
        sql = (f"SELECT DISTINCT ON (run_id) {HISTORY_COLUMNS} FROM history"
               " WHERE run_id = ANY($1::text[]) AND type = $2 ORDER BY run_id, seq")
        return {row[0]: HistoryRow(*row) for row in await self._fetch(sql, list(set(run_ids)), type_)}

    async def get_approval(self, id: str) -> ApprovalRow | None:
        rows = await self._fetch(f"SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id = $1", id)
        return ApprovalRow(*rows[0]) if rows else None

    async def list_approvals(self, *, status: str | None = None, run_id: str | None = None, limit: int = 50,
                             cursor: str | None = None) -> tuple[list[ApprovalRow], str | None]:
        return await self._page(ApprovalRow, "approvals", APPROVAL_COLUMNS, ("requested_at", "id"), limit, cursor,
                                (("status = {}", status), ("run_id = {}", run_id)))

    async def integrity_check(self) -> str:
        """"ok" when a query answers: PostgreSQL checks its own pages (there is no PRAGMA)."""
        try:
            await self._call("fetchval", "SELECT 1")
        except StoreError as exc:
            return exc.message
        return "ok"


async def _apply(conn: asyncpg.Connection, plan: Plan) -> None:
    """Run a plan inside the caller's transaction."""
    for name, holder, token in plan.fences:
        if await conn.fetchval(_HOLDS_LEASE, name, holder, token) is None:
            raise Fenced(f"lease {name} is no longer held by {holder} (token {token})")
    run_ids = {row[0] for kind, params in plan.statements if kind in _RUN_KINDS for row in params}
    if len(run_ids) > 1:
        await conn.execute(_LOCK_RUNS, sorted(run_ids))
    for kind, params in plan.statements:
        if kind == "runs":
            await _write_runs(conn, params, plan.check_revs)
        else:
            convert = _CONVERT.get(kind)
            await conn.executemany(_SQL[kind], params if convert is None else [convert(row) for row in params])


async def _write_runs(conn: asyncpg.Connection, rows: list[tuple], check_revs: bool) -> None:
    """Upsert run rows in commit order, one statement per wave; Stale names the first refused row."""
    sql = _UPSERT_RUNS_CHECKED if check_revs else _UPSERT_RUNS
    for wave in _waves(rows):
        written = {r for (r,) in await conn.fetch(sql, *map(list, zip(*wave)))}
        if len(written) != len(wave):
            run_id, rev = next((row[0], row[-1]) for row in wave if row[0] not in written)
            raise Stale(f"run {run_id} was changed by another decision (expected revision {rev})", run_id=run_id)


def _waves(rows: list[tuple]) -> list[list[tuple]]:
    """Rows split so no wave holds a run twice: the n-th write of each run goes in wave n."""
    waves: list[list[tuple]] = []
    seen: dict[str, int] = {}
    for row in rows:
        n = seen.get(row[0], 0)
        seen[row[0]] = n + 1
        if n == len(waves):
            waves.append([])
        waves[n].append(row)
    return waves


def _where(*terms: tuple[str, Any]) -> tuple[str, list[Any]]:
    """` WHERE a AND b` over the terms whose value is not None, with `{}` in each term
    numbered $1, $2, ... in turn, and their parameters (a tuple value fills several)."""
    parts: list[str] = []
    params: list[Any] = []
    for term, value in terms:
        if value is None:
            continue
        values = value if isinstance(value, tuple) else (value,)
        parts.append(term.format(*(f"${len(params) + i}" for i in range(1, len(values) + 1))))
        params.extend(values)
    return (" WHERE " + " AND ".join(parts) if parts else ""), params
