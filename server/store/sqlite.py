"""The SQLite store: one file in WAL mode, one writer with group commit, one reader.

Why it is shaped this way (figures: shared/NOTES.md, "SQLite"):

* A commit costs a WAL write (plus an fsync with synchronous=FULL) and every call
  into a SQLite thread costs a hop. One transaction per transition tops out near
  8k/s; ~200 transitions per transaction pass 100k/s. So `commit()` only
  enqueues; one writer task takes everything queued (up to `MAX_GROUP_BATCHES`),
  writes it as one transaction with one `executemany` per table and statement
  kind, then resolves every caller's future. While it writes, new commits queue
  up and form the next group: the group size follows the load, with no timer
  and no polling.
* The whole transaction is one plain function run on the writer's own thread:
  one hop per group. Issuing BEGIN, each executemany and COMMIT as separate
  aiosqlite calls was as fast under load but 4x slower for a lone commit
  (~1.2k/s against ~4.7k/s), and aiosqlite has no public call for "run this
  function on your thread".
* One bad batch must not fail its neighbours. If a group fails because of its
  data (a constraint, a value SQLite cannot bind), it is rolled back and its
  batches are retried one transaction each, so only the offending caller gets
  the error. A failure of the database itself (disk full, read-only, corrupt)
  fails the whole group with `StoreError`.
* Reads use a second connection (aiosqlite, query_only): WAL lets it read the
  last committed state while the writer works, so API reads never wait behind a
  group commit.
* synchronous=NORMAL (the default) survives a process crash but may lose the
  last transactions on power loss; synchronous=FULL does not, at 2/3 or less of
  the throughput (BATON_SQLITE_SYNC=full).

sqlite3 exceptions become `Conflict` / `StoreError` in `map_error`, here only.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from server.errors import BadRequest, BatonError, Conflict, Fenced, Stale, StoreError
from server.store.batching import (
    APPROVAL_COLUMNS, AUDIT_COLUMNS, DEAD_LETTER_COLUMNS, DEFINITION_COLUMNS, EVENT_COLUMNS,
    HISTORY_COLUMNS, OUTBOX_COLUMNS, RUN_COLUMNS, SCHEDULE_COLUMNS, SCHEDULE_FIRE_COLUMNS, SCHEDULE_UPDATE_COLUMNS,
    STEP_COLUMNS, STOP,
    TIMER_COLUMNS, GroupWriter, Pending, Plan, StoreStats, make_plan, stale_run,
)
from server.store.batching import migrations as load_migrations
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

# How long a statement waits for another process's lock before failing.
BUSY_TIMEOUT_MS = 5_000
# Bound parameters per statement: SQLite allows 999 before 3.32, 32766 since.
MAX_PARAMS = 900
SYNCHRONOUS = ("normal", "full")

T = TypeVar("T")

# -- SQL -----------------------------------------------------------------------

_TERMINAL_SQL = ", ".join(f"'{s}'" for s in TERMINAL)
_RESUMABLE_SQL = ", ".join(f"'{s}'" for s in RESUMABLE)

# The identity columns (workflow, version, def_hash, workflow_id, created_at) are
# written once: leaving them out of the UPDATE spares four index rewrites per
# transition (~15% of update throughput).
# ?12 is the rev the caller read; the row stored gets ?12 + 1.
_UPSERT_RUN = f"""
INSERT INTO runs ({RUN_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12 + 1)
ON CONFLICT (run_id) DO UPDATE SET
    status = excluded.status, updated_at = excluded.updated_at,
    finished_at = excluded.finished_at, inflight = excluded.inflight, data = excluded.data,
    rev = runs.rev + 1
"""
# The same, written only over the rev read (a new run only with rev 0): a row that
# fails the check changes nothing, which the writer sees in the row count.
_UPSERT_RUN_CHECKED = f"""
INSERT INTO runs ({RUN_COLUMNS}) SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12 + 1
    WHERE ?12 = 0 OR EXISTS (SELECT 1 FROM runs WHERE run_id = ?1)
ON CONFLICT (run_id) DO UPDATE SET
    status = excluded.status, updated_at = excluded.updated_at,
    finished_at = excluded.finished_at, inflight = excluded.inflight, data = excluded.data,
    rev = excluded.rev
WHERE runs.rev = excluded.rev - 1
"""
_UPSERT_STEP = f"""
INSERT INTO steps ({STEP_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (run_id, key) DO UPDATE SET
    step_id = excluded.step_id, status = excluded.status, attempt = excluded.attempt,
    started_at = excluded.started_at, finished_at = excluded.finished_at, data = excluded.data
"""
_DELETE_STEP = "DELETE FROM steps WHERE run_id = ? AND key = ?"
_INSERT_HISTORY = f"INSERT INTO history ({HISTORY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)"
_UPSERT_TIMER = f"""
INSERT INTO timers ({TIMER_COLUMNS}) VALUES (?, ?, ?)
ON CONFLICT (run_id, timer_id) DO UPDATE SET fire_at = excluded.fire_at
"""
_DELETE_TIMER = "DELETE FROM timers WHERE run_id = ? AND timer_id = ?"
_INSERT_DEFINITION = (
    f"INSERT INTO definitions ({DEFINITION_COLUMNS}) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (def_hash) DO NOTHING"
)
_INSERT_EVENT = f"INSERT INTO events ({EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?) ON CONFLICT (event_key) DO NOTHING"
_PRUNE_EVENTS = "DELETE FROM events WHERE received_at < ?"
_INSERT_DEAD_LETTER = f"INSERT INTO dead_letters ({DEAD_LETTER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
_REPLAYED_DEAD_LETTER = "UPDATE dead_letters SET replayed_at = ?, replay_run = ? WHERE id = ?"
_INSERT_OUTBOX = f"INSERT INTO outbox ({OUTBOX_COLUMNS}) VALUES (?, ?, ?, ?, ?)"
_DELETE_OUTBOX = "DELETE FROM outbox WHERE id = ?"
_INSERT_APPROVAL = (
    f"INSERT INTO approvals ({APPROVAL_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (id) DO NOTHING"
)
# Only a pending request closes: a decision can never overwrite another one.
_CLOSE_APPROVAL = (
    "UPDATE approvals SET status = ?, decided_at = ?, decided_by = ?, decided_via = ?, comment = ?"
    " WHERE id = ? AND status = 'pending'"
)
_INSERT_AUDIT = f"INSERT INTO audit ({AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
_UPSERT_SCHEDULE = (f"INSERT INTO schedules ({SCHEDULE_COLUMNS}) VALUES ({', '.join('?' * 13)})"
                    " ON CONFLICT (name) DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in SCHEDULE_UPDATE_COLUMNS))
_PAUSE_SCHEDULE = ("UPDATE schedules SET paused = ?, paused_by = ?, paused_at = ?, pause_note = ?,"
                   " next_at = COALESCE(?, next_at), updated_at = ? WHERE name = ?")
_INSERT_SCHEDULE_FIRE = f"INSERT INTO schedule_fires ({SCHEDULE_FIRE_COLUMNS}) VALUES ({', '.join('?' * 11)})"
# keep the newest N rows of one schedule
_PRUNE_SCHEDULE_FIRES = (
    "DELETE FROM schedule_fires WHERE schedule = ?1 AND id <= ("
    "SELECT id FROM schedule_fires WHERE schedule = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2)"
)
_HOLDS_LEASE = "SELECT 1 FROM leases WHERE name = ? AND holder = ? AND token = ? AND expires_at > ?"
# Free (never taken, expired) or ours: take or renew it; a new holder bumps the token.
_ACQUIRE_LEASE = """
INSERT INTO leases (name, holder, token, expires_at) VALUES (?1, ?2, 1, ?3 + ?4)
ON CONFLICT (name) DO UPDATE SET
    token = CASE WHEN leases.holder = excluded.holder THEN leases.token ELSE leases.token + 1 END,
    holder = excluded.holder, expires_at = excluded.expires_at
WHERE leases.holder = excluded.holder OR leases.expires_at <= ?3
RETURNING token
"""
# Expired rather than deleted: the token stays, so the next holder's is still larger.
_RELEASE_LEASE = "UPDATE leases SET expires_at = min(expires_at, ?) WHERE name = ? AND holder = ?"


# The statement of each plan kind but runs (checked or not, see _apply).
_SQL = {
    "steps_deleted": _DELETE_STEP,
    "timers_deleted": _DELETE_TIMER,
    "steps": _UPSERT_STEP,
    "history": _INSERT_HISTORY,
    "timers": _UPSERT_TIMER,
    "definitions": _INSERT_DEFINITION,
    "outbox": _INSERT_OUTBOX,
    "outbox_deleted": _DELETE_OUTBOX,
    "events_pruned": _PRUNE_EVENTS,
    "events": _INSERT_EVENT,
    "dead_letters": _INSERT_DEAD_LETTER,
    "dead_letters_replayed": _REPLAYED_DEAD_LETTER,
    "approvals": _INSERT_APPROVAL,
    "approvals_closed": _CLOSE_APPROVAL,
    "audit": _INSERT_AUDIT,
    "schedules": _UPSERT_SCHEDULE,
    "schedule_pauses": _PAUSE_SCHEDULE,
    "schedule_fires": _INSERT_SCHEDULE_FIRE,
    "schedule_fires_pruned": _PRUNE_SCHEDULE_FIRES,
}


# -- error mapping -------------------------------------------------------------

_UNIQUE = ("SQLITE_CONSTRAINT_UNIQUE", "SQLITE_CONSTRAINT_PRIMARYKEY")
# Constraints the API will meet, in words; any other passes its columns through.
_CONFLICT_MESSAGES = {
    "runs.workflow, runs.workflow_id": "an open run of this workflow already has this workflow_id",
    "history.run_id, history.seq": "this history entry (run_id, seq) is already recorded",
}
# What the operator should know, by sqlite_errorname prefix (extended codes share it).
_ERROR_MESSAGES = {
    "SQLITE_FULL": "the disk is full",
    "SQLITE_READONLY": "the database is read-only (check the permissions of its directory and its -wal and -shm files)",
    "SQLITE_CANTOPEN": "the database file cannot be opened",
    "SQLITE_PERM": "permission denied on the database file",
    "SQLITE_CORRUPT": "the database file is corrupt",
    "SQLITE_NOTADB": "the file is not a SQLite database",
    "SQLITE_BUSY": "the database is locked by another process",
    "SQLITE_LOCKED": "the database is locked",
    # EFBIG (a file size limit) and some full disks come as a write error, not SQLITE_FULL
    "SQLITE_IOERR_WRITE": "cannot write the database file (is the disk full, or a file size limit reached?)",
    "SQLITE_IOERR": "I/O error on the database file",
}
# Errors caused by one batch's data rather than by the database: retry one by one.
_BATCH_ERRORS = (sqlite3.IntegrityError, sqlite3.DataError, sqlite3.InterfaceError, sqlite3.ProgrammingError)


def map_error(exc: sqlite3.Error, path: str) -> BatonError:
    """Conflict for a unique violation, StoreError for anything else."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    if isinstance(exc, sqlite3.IntegrityError) and name in _UNIQUE:
        columns = str(exc).removeprefix("UNIQUE constraint failed: ")
        error: BatonError = Conflict(_CONFLICT_MESSAGES.get(columns, f"already recorded: {columns}"))
    else:
        what = next((m for code, m in _ERROR_MESSAGES.items() if name.startswith(code)), "SQLite error")
        error = StoreError(f"{what}: {path}: {exc} ({name or type(exc).__name__})")
    error.__cause__ = exc
    return error


def _is_batch_error(exc: Exception) -> bool:
    # A non-sqlite exception (an int SQLite cannot hold, a row of the wrong type)
    # comes from the data too.
    return isinstance(exc, _BATCH_ERRORS) or not isinstance(exc, sqlite3.Error)


# -- group commit --------------------------------------------------------------


def _apply(conn: sqlite3.Connection, plan: Plan) -> None:
    """Run a plan as one transaction. Called on the writer thread."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        now = time.time()
        for name, holder, token in plan.fences:
            if conn.execute(_HOLDS_LEASE, (name, holder, token, now)).fetchone() is None:
                raise Fenced(f"lease {name} is no longer held by {holder} (token {token})")
        for kind, params in plan.statements:
            sql = _SQL[kind] if kind != "runs" else _UPSERT_RUN_CHECKED if plan.check_revs else _UPSERT_RUN
            # executemany sums the rows each parameter set changed
            if conn.executemany(sql, params).rowcount != len(params) and sql is _UPSERT_RUN_CHECKED:
                conn.execute("ROLLBACK")  # to read the revs as they were before this plan
                raise _stale(conn, params)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _stale(conn: sqlite3.Connection, runs: list[tuple]) -> Stale:
    """Stale naming the first run row (in commit order) whose rev did not match."""
    ids = list({row[0] for row in runs})
    stored: dict[str, int] = {}
    for start in range(0, len(ids), MAX_PARAMS):
        chunk = ids[start : start + MAX_PARAMS]
        sql = f"SELECT run_id, rev FROM runs WHERE run_id IN ({', '.join('?' * len(chunk))})"
        stored.update(conn.execute(sql, chunk).fetchall())
    return stale_run(stored, [(row[0], row[-1]) for row in runs])


# -- schema migrations ---------------------------------------------------------

def _statements(script: str) -> Iterator[str]:
    """Split a script into statements: executescript() would COMMIT our transaction."""
    start = 0
    for match in re.finditer(";", script):
        if sqlite3.complete_statement(script[start : match.end()]):
            yield script[start : match.end()]
            start = match.end()
    if script[start:].strip():
        yield script[start:]  # comments only, or an incomplete statement SQLite reports


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to the latest version, in one transaction. Writes nothing when current."""
    migrations = load_migrations("server.store.migrations")
    latest = len(migrations)
    current = _user_version(conn)
    if current == latest:
        return  # so a read-only database still opens
    if current > latest:
        raise StoreError(
            f"the database schema is version {current}, newer than this Baton knows"
            f" ({latest}); upgrade Baton"
        )
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Under the write lock now: another process may have migrated meanwhile.
        for version, script in migrations[_user_version(conn) :]:
            for statement in _statements(script):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _user_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def _connect_writer(path: str, synchronous: str) -> sqlite3.Connection:
    # isolation_level=None: no implicit transactions; we write BEGIN and COMMIT.
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        for pragma in _PRAGMAS:
            conn.execute(pragma)
        _migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


_PRAGMAS = (
    f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}",
    "PRAGMA foreign_keys = OFF",
    "PRAGMA temp_store = MEMORY",
)


@contextmanager
def _mapped(path: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.Error as exc:
        raise map_error(exc, path) from exc


# -- the store -----------------------------------------------------------------


class SQLiteStore(GroupWriter):
    """The Store on one SQLite file. `stats` counts what the writer did."""

    def __init__(self, path: str | Path, *, synchronous: str = "normal", check_revs: bool = False) -> None:
        if str(path) == ":memory:" or str(path).startswith("file:"):
            raise ValueError("SQLiteStore needs a file path: its reader and writer share the file")
        if synchronous.lower() not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS}, not {synchronous!r}")
        self.path = Path(path)
        self.where = str(self.path)  # for messages
        self.synchronous = synchronous.lower()
        self.check_revs = check_revs
        self.stats = StoreStats()
        self._thread: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # used on self._thread only
        self._reader: aiosqlite.Connection | None = None
        self._queue: asyncio.Queue[Pending | object] | None = None
        self._writer: asyncio.Task[None] | None = None
        # told (batches, seconds) of each group committed in one transaction (metrics)
        self.on_group: Callable[[int, float], None] | None = None

    # -- lifetime --

    async def open(self) -> None:
        if self._writer is not None:
            raise RuntimeError("the store is already open")
        where = str(self.path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the database directory: {exc}") from exc
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="baton-store-writer")
        try:
            with _mapped(where):
                self._conn = await self._on_thread(_connect_writer, where, self.synchronous.upper())
                self._reader = await aiosqlite.connect(where, isolation_level=None)
                for pragma in (*_PRAGMAS, "PRAGMA query_only = ON"):
                    await self._reader.execute(pragma)
        except BaseException:
            await self._release()
            raise
        self._queue = asyncio.Queue()
        self._writer = asyncio.create_task(self._write_loop(self._queue), name=f"baton-store-writer {where}")

    async def close(self) -> None:
        """Write what was committed before the call, then release the file."""
        writer, self._writer = self._writer, None
        if writer is not None:
            assert self._queue is not None
            self._queue.put_nowait(STOP)
            await asyncio.wait([writer])  # if it was cancelled instead, its callers were told
        await self._release()

    async def _release(self) -> None:
        conn, self._conn = self._conn, None
        reader, self._reader = self._reader, None
        thread, self._thread = self._thread, None
        if reader is not None:
            await reader.close()
        if thread is not None:
            if conn is not None:
                await asyncio.get_running_loop().run_in_executor(thread, conn.close)
            thread.shutdown()  # idle by now: returns at once

    async def _on_thread(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._thread is not None
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    # -- writing --

    async def _transaction(self, items: Iterable[Batch | DefinitionRow]) -> None:
        plan = make_plan(items, self.check_revs)
        if plan.statements or plan.fences:
            await self._on_thread(_apply, self._conn, plan)

    def _is_batch_error(self, exc: BaseException) -> bool:
        return _is_batch_error(exc)

    def _caller_error(self, exc: BaseException) -> BaseException:
        # a bug in this caller's batch, or a StoreError of ours, passes as it is
        return map_error(exc, str(self.path)) if isinstance(exc, sqlite3.Error) else exc

    async def _fetch(self, sql: str, params: Iterable[Any] = ()) -> list[tuple]:
        if self._reader is None:
            raise StoreError(f"the store is not open: {self.path}")
        with _mapped(str(self.path)):
            return list(await self._reader.execute_fetchall(sql, tuple(params)))

    async def get_run(self, run_id: str) -> RunRow | None:
        rows = await self._fetch(f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,))
        return RunRow(*rows[0]) if rows else None

    async def get_runs(self, run_ids: list[str]) -> list[RunRow]:
        unique = list(dict.fromkeys(run_ids))
        found: dict[str, RunRow] = {}
        for start in range(0, len(unique), MAX_PARAMS):
            chunk = unique[start : start + MAX_PARAMS]
            sql = f"SELECT {RUN_COLUMNS} FROM runs WHERE run_id IN ({', '.join('?' * len(chunk))})"
            for row in await self._fetch(sql, chunk):
                found[row[0]] = RunRow(*row)
        return [found[run_id] for run_id in run_ids if run_id in found]

    async def get_steps(self, run_id: str) -> list[StepRow]:
        sql = f"SELECT {STEP_COLUMNS} FROM steps WHERE run_id = ? ORDER BY rowid"
        return [StepRow(*row) for row in await self._fetch(sql, (run_id,))]

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
            ("workflow = ?", workflow), ("status = ?", status), ("workflow_id = ?", workflow_id),
            ("created_at >= ?", since), ("created_at < ?", until),
        ))

    async def _page(self, row_type: Callable[..., Any], table: str, columns: str, key: tuple[str, str], limit: int,
                    cursor: str | None, terms: tuple[tuple[str, Any], ...]) -> tuple[list[Any], str | None]:
        """A keyset page, newest first by `key` (a time and an id), with the cursor of the next."""
        if limit < 1:
            raise BadRequest(f"limit must be at least 1, not {limit}", field="limit")
        when, ident = key
        where, params = _where(*terms, (f"({when}, {ident}) < (?, ?)", None if cursor is None else decode_cursor(cursor)))
        sql = f"SELECT {columns} FROM {table}{where} ORDER BY {when} DESC, {ident} DESC LIMIT ?"
        rows = [row_type(*row) for row in await self._fetch(sql, [*params, limit + 1])]
        if len(rows) <= limit:
            return rows, None
        del rows[limit:]
        return rows, encode_cursor(getattr(rows[-1], when), getattr(rows[-1], ident))

    async def history(self, run_id: str, *, after_seq: int = 0, limit: int = 1000) -> list[HistoryRow]:
        sql = f"SELECT {HISTORY_COLUMNS} FROM history WHERE run_id = ? AND seq > ? ORDER BY seq LIMIT ?"
        return [HistoryRow(*row) for row in await self._fetch(sql, (run_id, after_seq, limit))]

    async def recoverable_runs(self) -> list[RunRow]:
        # The status term repeats the WHERE of the partial index runs_open, so the
        # planner reads the open runs only.
        sql = (
            f"SELECT {RUN_COLUMNS} FROM runs WHERE status NOT IN ({_TERMINAL_SQL})"
            f" AND (inflight > 0 OR status IN ({_RESUMABLE_SQL})) ORDER BY created_at, run_id"
        )
        return [RunRow(*row) for row in await self._fetch(sql)]

    async def find_open_run(self, workflow: str, workflow_id: str) -> RunRow | None:
        sql = (
            f"SELECT {RUN_COLUMNS} FROM runs"
            f" WHERE workflow = ? AND workflow_id = ? AND status NOT IN ({_TERMINAL_SQL})"
        )
        rows = await self._fetch(sql, (workflow, workflow_id))
        return RunRow(*rows[0]) if rows else None

    async def due_timers(self, until: float, limit: int) -> list[TimerRow]:
        sql = (
            f"SELECT {TIMER_COLUMNS} FROM timers WHERE fire_at <= ?"
            " ORDER BY fire_at, run_id, timer_id LIMIT ?"
        )
        return [TimerRow(*row) for row in await self._fetch(sql, (until, limit))]

    async def next_timer_at(self) -> float | None:
        ((fire_at,),) = await self._fetch("SELECT min(fire_at) FROM timers")
        return fire_at

    async def count_timers(self) -> int:
        ((count,),) = await self._fetch("SELECT count(*) FROM timers")
        return count

    # Both read the open runs only, through the partial index runs_open, then their steps
    # (CROSS JOIN keeps that order): without statistics the planner would rather scan every
    # run, or every step ever written, to spare itself a sort.
    async def open_run_counts(self) -> list[tuple[str, str, int]]:
        """(workflow, status, count) of the runs not finished (read once at start, for metrics)."""
        sql = (f"SELECT workflow, status, count(*) FROM runs INDEXED BY runs_open WHERE status NOT IN ({_TERMINAL_SQL})"
               " GROUP BY workflow, status")
        return [tuple(row) for row in await self._fetch(sql)]

    async def waiting_step_counts(self) -> list[tuple[str, str, int]]:
        """(def_hash, step_id, count) of the steps waiting (for a signal, an approval, a time)
        in runs not finished (read once at start, for metrics)."""
        sql = ("SELECT r.def_hash, s.step_id, count(*) FROM runs r INDEXED BY runs_open"
               f" CROSS JOIN steps s ON s.run_id = r.run_id WHERE r.status NOT IN ({_TERMINAL_SQL})"
               " AND s.status = 'waiting' GROUP BY r.def_hash, s.step_id")
        return [tuple(row) for row in await self._fetch(sql)]

    async def get_definition(self, def_hash: str) -> DefinitionRow | None:
        sql = f"SELECT {DEFINITION_COLUMNS} FROM definitions WHERE def_hash = ?"
        rows = await self._fetch(sql, (def_hash,))
        return DefinitionRow(*rows[0]) if rows else None

    async def list_definitions(self, name: str | None = None) -> list[DefinitionRow]:
        where = " WHERE name = ?" if name is not None else ""
        sql = f"SELECT {DEFINITION_COLUMNS} FROM definitions{where} ORDER BY name, created_at, def_hash"
        return [DefinitionRow(*row) for row in await self._fetch(sql, () if name is None else (name,))]

    async def get_event(self, event_key: str) -> EventRow | None:
        rows = await self._fetch(f"SELECT {EVENT_COLUMNS} FROM events WHERE event_key = ?", (event_key,))
        return EventRow(*rows[0]) if rows else None

    async def list_dead_letters(self, *, limit: int = 50, before_id: int | None = None) -> list[DeadLetterRow]:
        if limit < 1:
            raise BadRequest(f"limit must be at least 1, not {limit}", field="limit")
        where = " WHERE id < ?" if before_id is not None else ""
        params = (before_id, limit) if before_id is not None else (limit,)
        sql = f"SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters{where} ORDER BY id DESC LIMIT ?"
        return [DeadLetterRow(*row) for row in await self._fetch(sql, params)]

    async def get_dead_letter(self, id: int) -> DeadLetterRow | None:
        rows = await self._fetch(f"SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters WHERE id = ?", (id,))
        return DeadLetterRow(*rows[0]) if rows else None

    async def outbox_pending(self, limit: int, after_id: int = 0) -> list[OutboxRow]:
        sql = f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE id > ? ORDER BY id LIMIT ?"
        return [OutboxRow(*row) for row in await self._fetch(sql, (after_id, limit))]

    async def outbox_rows(self, ids: list[int]) -> list[OutboxRow]:
        rows: list[OutboxRow] = []
        for start in range(0, len(ids), MAX_PARAMS):  # SQLite's bound on parameters
            chunk = ids[start:start + MAX_PARAMS]
            sql = f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE id IN ({', '.join('?' * len(chunk))})"
            rows += [OutboxRow(*row) for row in await self._fetch(sql, tuple(chunk))]
        return sorted(rows, key=lambda row: row.id)

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
        where, params = _where(
            ("id < ?", before_id), ("at >= ?", since), ("at < ?", until), ("actor = ?", actor), ("action = ?", action)
        )
        sql = f"SELECT {AUDIT_COLUMNS} FROM audit{where} ORDER BY id DESC LIMIT ?"
        return [AuditRow(*row) for row in await self._fetch(sql, [*params, limit])]

    async def list_schedules(self) -> list[ScheduleRow]:
        rows = await self._fetch(f"SELECT {SCHEDULE_COLUMNS} FROM schedules ORDER BY name")
        return [ScheduleRow(*row[:4], bool(row[4]), *row[5:]) for row in rows]

    async def list_schedule_fires(self, schedule: str, *, limit: int = 50,
                                  before_id: int | None = None) -> list[ScheduleFireRow]:
        if limit < 1:
            raise BadRequest(f"limit must be at least 1, not {limit}", field="limit")
        where, params = _where(("schedule = ?", schedule), ("id < ?", before_id))
        sql = f"SELECT {SCHEDULE_FIRE_COLUMNS} FROM schedule_fires{where} ORDER BY id DESC LIMIT ?"
        return [ScheduleFireRow(*row[:7], bool(row[7]), bool(row[8]), *row[9:])
                for row in await self._fetch(sql, [*params, limit])]

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
        terms = [("workflow = ?", workflow), ("status = ?", status), ("created_at >= ?", since),
                 ("created_at < ?", until)]
        after: tuple[float, str] | None = None
        while True:
            where, params = _where(*terms)
            if after is not None:  # keyset: the page starts just past the last row of the previous one
                where += f"{' AND' if where else ' WHERE'} (created_at, run_id) > (?, ?)"
                params += after
            sql = f"SELECT {RUN_COLUMNS} FROM runs{where} ORDER BY created_at, run_id LIMIT ?"
            page = [RunRow(*row) for row in await self._fetch(sql, [*params, page_size])]
            if page:
                yield page
            if len(page) < page_size:
                return
            after = (page[-1].created_at, page[-1].run_id)

    async def iter_history(self, run_ids: list[str], *, types: tuple[str, ...] | None = None,
                           page_size: int = 5000) -> AsyncIterator[list[HistoryRow]]:
        if page_size < 1:
            raise BadRequest(f"page size must be at least 1, not {page_size}", field="page_size")
        # sorted: the pages walk (run_id, seq) upwards, so each run's chunk of ids is done
        # before the next starts; the primary key (run_id, seq) serves every page
        unique = sorted(set(run_ids))
        types = tuple(types or ())
        only = f" AND type IN ({', '.join('?' * len(types))})" if types else ""
        per_chunk = max(1, MAX_PARAMS - 3 - len(types))
        for start in range(0, len(unique), per_chunk):
            chunk = unique[start : start + per_chunk]
            after: tuple[str, int] = ("", 0)
            while True:
                sql = (
                    f"SELECT {HISTORY_COLUMNS} FROM history WHERE run_id IN ({', '.join('?' * len(chunk))}){only}"
                    " AND (run_id, seq) > (?, ?) ORDER BY run_id, seq LIMIT ?"
                )
                page = [HistoryRow(*row) for row in await self._fetch(sql, [*chunk, *types, *after, page_size])]
                if page:
                    yield page
                if len(page) < page_size:
                    break
                after = (page[-1].run_id, page[-1].seq)

    async def steps_of(self, run_ids: list[str]) -> list[StepRow]:
        unique = list(dict.fromkeys(run_ids))
        rows: list[StepRow] = []
        for start in range(0, len(unique), MAX_PARAMS):
            chunk = unique[start : start + MAX_PARAMS]
            sql = f"SELECT {STEP_COLUMNS} FROM steps WHERE run_id IN ({', '.join('?' * len(chunk))}) ORDER BY run_id, rowid"
            rows += [StepRow(*row) for row in await self._fetch(sql, chunk)]
        return rows

    async def first_history(self, run_ids: list[str], type_: str) -> dict[str, HistoryRow]:
        unique = list(dict.fromkeys(run_ids))
        found: dict[str, HistoryRow] = {}
        for start in range(0, len(unique), MAX_PARAMS - 1):
            chunk = unique[start : start + MAX_PARAMS - 1]
            # per run, a walk of its primary key from seq 1 that stops at the first match
            sql = (
                f"SELECT {HISTORY_COLUMNS} FROM history h WHERE h.run_id IN ({', '.join('?' * len(chunk))})"
                " AND h.seq = (SELECT seq FROM history WHERE run_id = h.run_id AND type = ? ORDER BY seq LIMIT 1)"
            )
            for row in await self._fetch(sql, [*chunk, type_]):
                found[row[0]] = HistoryRow(*row)
        return found

    async def get_approval(self, id: str) -> ApprovalRow | None:
        rows = await self._fetch(f"SELECT {APPROVAL_COLUMNS} FROM approvals WHERE id = ?", (id,))
        return ApprovalRow(*rows[0]) if rows else None

    async def list_approvals(self, *, status: str | None = None, run_id: str | None = None, limit: int = 50,
                             cursor: str | None = None) -> tuple[list[ApprovalRow], str | None]:
        return await self._page(ApprovalRow, "approvals", APPROVAL_COLUMNS, ("requested_at", "id"), limit, cursor,
                                (("status = ?", status), ("run_id = ?", run_id)))

    async def integrity_check(self) -> str:
        return "\n".join(str(message) for (message,) in await self._fetch("PRAGMA integrity_check"))

    # -- leases: on the writer's thread, between two group commits --

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> int | None:
        row = await self._lease_write(_ACQUIRE_LEASE, (name, holder, time.time(), ttl_s))
        return None if row is None else row[0]

    async def release_lease(self, name: str, holder: str) -> None:
        await self._lease_write(_RELEASE_LEASE, (time.time(), name, holder))

    async def _lease_write(self, sql: str, params: tuple) -> tuple | None:
        if self._conn is None:
            raise StoreError(f"the store is not open: {self.path}")
        conn = self._conn
        with _mapped(str(self.path)):
            # fetchall: the statement must run to its end, which commits it
            rows = await self._on_thread(lambda: conn.execute(sql, params).fetchall())
        return rows[0] if rows else None

    async def get_lease(self, name: str) -> tuple[str, int, float] | None:
        rows = await self._fetch("SELECT holder, token, expires_at FROM leases WHERE name = ?", (name,))
        return tuple(rows[0]) if rows else None  # type: ignore[return-value]

    async def list_leases(self, prefix: str = "") -> list[tuple[str, str, int, float, float]]:
        now = time.time()
        # substr, not LIKE: a prefix may hold % or _
        rows = await self._fetch("SELECT name, holder, token, expires_at FROM leases"
                                 " WHERE substr(name, 1, length(?1)) = ?1 ORDER BY name", (prefix,))
        return [(*row, now) for row in rows]

    async def drop_lease(self, name: str, holder: str) -> None:
        await self._lease_write("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

    async def shared_secret(self, name: str, candidate: str) -> str:
        await self._lease_write("INSERT INTO secrets (name, value) VALUES (?, ?) ON CONFLICT DO NOTHING", (name, candidate))
        rows = await self._fetch("SELECT value FROM secrets WHERE name = ?", (name,))
        return rows[0][0]


def _where(*terms: tuple[str, Any]) -> tuple[str, list[Any]]:
    """` WHERE a AND b` over the terms whose value is not None, and their parameters
    (a tuple value fills a term with several `?`)."""
    used = [(term, value) for term, value in terms if value is not None]
    if not used:
        return "", []
    params: list[Any] = []
    for _, value in used:
        params.extend(value if isinstance(value, tuple) else (value,))
    return " WHERE " + " AND ".join(term for term, _ in used), params
