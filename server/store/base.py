"""The store: durable records of runs, steps, history, timers and definitions.

Rules every implementation keeps:

* `commit(batch)` is all or nothing, and durable when it returns. Nothing else
  writes runs, steps, history or timers, so "decide, commit, act" holds: the
  runtime dispatches a batch's commands only after its commit returned.
* Batches apply in the order `commit` was called. Inside one batch, upserts apply
  before deletes (a step or timer both upserted and deleted ends up deleted).
* Upserts are keyed by `run_id`, `(run_id, key)` and `(run_id, timer_id)`. A
  run's identity (workflow, version, def_hash, workflow_id, created_at) is
  written when the run is first stored; later upserts update status,
  updated_at, finished_at, inflight and data. A step upsert replaces the row but
  keeps the step's place in `get_steps`; a step deleted and written again goes
  last.
* A run is open while its status is not in `TERMINAL`. Two open runs of one
  workflow never share a `workflow_id`: the batch that would make it so fails
  with `Conflict`, and no other batch is affected. Re-inserting an existing
  `(run_id, seq)` history row is also a `Conflict`.
* Run revisions fence concurrent writers (several replicas on one database): a
  `RunRow` with `rev = r` is written only if the stored row's rev is r (or no row
  exists and r is 0), and the stored rev becomes r + 1; reads return the stored
  rev. A run row that fails the check fails its batch with `Stale` (a Conflict),
  and no other batch. A store built with `check_revs=False` still counts revs up
  but never checks them.
* A batch with a `fence` (lease name, holder, token) commits only if, inside its
  transaction, that lease is held by that holder with that token and has not
  expired; else it fails alone with `Fenced` (a Conflict). Lease tokens only ever
  grow: each change of holder adds one, so a stale leader's token is refused.
* Any other failure of the store (disk full, read-only file, corruption, a lost
  connection) is a `StoreError`. Implementations map their library's exceptions
  to these.
* `data` and `source` fields are opaque bytes owned by the engine (JSON).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from collections.abc import AsyncIterator
from typing import Protocol

import orjson

from server.errors import BadRequest

TERMINAL = ("succeeded", "failed", "compensated", "cancelled")
# Open runs that recovery resumes even with nothing in flight: a queued run has
# not started yet, a compensating run still has undo steps to schedule.
RESUMABLE = ("queued", "compensating")
# Row ids (audit entries, dead letters) are SQLite integers: signed 64-bit.
MAX_ID = 2**63 - 1


def parse_id(text: str, field: str) -> int:
    """A row id (or a cursor that is one) from a caller: ASCII digits only (`isdigit`
    alone takes "²", which int() refuses) within MAX_ID (a larger one would overflow
    the driver); anything else is no id Baton gave out: BadRequest naming `field`."""
    if not (text.isascii() and text.isdigit()) or int(text) > MAX_ID:
        raise BadRequest(f"invalid {field} {text!r}: expected a number Baton gave out", field=field)
    return int(text)


@dataclass(slots=True)
class RunRow:
    run_id: str
    workflow: str
    version: str
    def_hash: str
    workflow_id: str | None
    status: str
    created_at: float
    updated_at: float
    finished_at: float | None
    inflight: int  # tasks dispatched and not yet finished
    data: bytes
    # the stored revision this row was read at (0: a new run); the commit checks and bumps it
    rev: int = 0


@dataclass(slots=True)
class StepRow:
    run_id: str
    key: str
    step_id: str
    status: str
    attempt: int
    started_at: float | None
    finished_at: float | None
    data: bytes


@dataclass(slots=True)
class HistoryRow:
    run_id: str
    seq: int
    at: float
    type: str
    key: str | None
    data: bytes


@dataclass(slots=True)
class TimerRow:
    run_id: str
    timer_id: str
    fire_at: float


@dataclass(slots=True)
class EventRow:
    event_key: str  # Nats-Msg-Id, or CloudEvents `source` + `id`
    subject: str
    received_at: float
    outcome: str  # started | unmatched | dead_lettered
    runs: bytes  # JSON [{"workflow", "run_id", "created"}]


@dataclass(slots=True)
class DeadLetterRow:
    id: int | None  # assigned by the store
    at: float
    subject: str
    event_key: str | None
    workflow: str | None
    error: str
    headers: bytes  # JSON object: the original message's headers
    data: bytes  # the original message body
    replayed_at: float | None = None
    replay_run: str | None = None


@dataclass(slots=True)
class OutboxRow:
    id: int | None  # assigned by the store, in commit order
    subject: str
    msg_id: str  # Nats-Msg-Id: a re-publish after a crash is deduplicated by the stream
    headers: bytes  # JSON object
    data: bytes


@dataclass(slots=True)
class AuditRow:
    """One entry of the audit log: who did what, when, from where, with what outcome."""

    id: int | None  # assigned by the store, in commit order
    at: float
    actor: str  # a token name, "unauthenticated", "hook:<path>", "system", ...
    action: str  # the API operation (start_run, cancel, ...) or e.g. "definition.loaded"
    target: str | None  # what it acted on: "run:<id>", "workflow:<name>", ...
    remote: str | None  # the caller's address
    status: int | None  # the HTTP status answered; None for actions outside a request
    request_id: str | None
    detail: bytes  # JSON object


@dataclass(slots=True)
class Batch:
    """Everything one decision writes; committed in one transaction."""

    runs: list[RunRow] = field(default_factory=list)
    steps: list[StepRow] = field(default_factory=list)
    history: list[HistoryRow] = field(default_factory=list)
    timers_set: list[TimerRow] = field(default_factory=list)
    timers_deleted: list[tuple[str, str]] = field(default_factory=list)  # (run_id, timer_id)
    steps_deleted: list[tuple[str, str]] = field(default_factory=list)  # (run_id, key)
    outbox: list[OutboxRow] = field(default_factory=list)
    outbox_deleted: list[int] = field(default_factory=list)  # ids published
    events: list[EventRow] = field(default_factory=list)  # an existing key is left as it is
    events_pruned_before: float | None = None  # delete event rows received before this
    dead_letters: list[DeadLetterRow] = field(default_factory=list)
    dead_letters_replayed: list[tuple[int, float, str]] = field(default_factory=list)  # (id, at, run_id)
    audit: list[AuditRow] = field(default_factory=list)  # appended; the store assigns ids
    # a def_hash already stored is left as it is; with `audit`, a new definition and its
    # audit entry are written together
    definitions: list[DefinitionRow] = field(default_factory=list)
    approvals: list[ApprovalRow] = field(default_factory=list)  # an existing id is left as it is
    approvals_closed: list[ApprovalClosed] = field(default_factory=list)  # after `approvals`, in order
    # upserted by name, the last one wins; an existing row keeps its pause columns (paused,
    # paused_by, paused_at, pause_note): only `schedule_pauses` change those
    schedules: list[ScheduleRow] = field(default_factory=list)
    # an operator's pause or resume of a stored schedule: its pause columns, its updated_at,
    # and on a resume its next_at, whatever the rest of the row says. Replicas:
    # the time leader's fire, written from the row it read before, does not undo a pause
    # made meanwhile on another replica, and that pause does not undo the fire.
    schedule_pauses: list[ScheduleRow] = field(default_factory=list)
    schedule_fires: list[ScheduleFireRow] = field(default_factory=list)  # appended; the store assigns ids
    schedule_fires_pruned: list[tuple[str, int]] = field(default_factory=list)  # (schedule, rows to keep)
    # (lease name, holder, token): commit only while that lease is still held so
    fence: tuple[str, str, int] | None = None


@dataclass(slots=True)
class ApprovalRow:
    """A request for a person's decision, written when the step starts waiting."""

    id: str  # <run_id>:<step key>:<attempt>
    run_id: str
    key: str
    step_id: str
    status: str  # pending | approved | rejected | expired | cancelled
    requested_at: float
    expires_at: float | None
    decided_at: float | None = None
    decided_by: str | None = None
    decided_via: str | None = None  # token | link | api | timeout
    comment: str | None = None
    data: bytes = b"{}"  # JSON object: workflow, version, message, approvers, started_by, ...


@dataclass(slots=True)
class ApprovalClosed:
    """A pending request left pending: decided, timed out or cancelled with its run."""

    id: str
    status: str  # approved | rejected | expired | cancelled
    decided_at: float
    decided_by: str | None = None
    decided_via: str | None = None
    comment: str | None = None


@dataclass(slots=True)
class ScheduleRow:
    """Where one schedule stands (server/triggers/scheduler.py)."""

    name: str
    workflow: str
    spec_hash: str
    next_at: float | None  # the next nominal fire; None once it has ended
    paused: bool
    paused_by: str | None
    paused_at: float | None
    pause_note: str | None
    last_fire_at: float | None
    last_run_id: str | None
    last_outcome: str | None
    queued: bytes  # JSON list of nominal fire times held back by `overlap: queue`
    updated_at: float


@dataclass(slots=True)
class ScheduleFireRow:
    """One fire of a schedule: the run it started, or why it started none."""

    id: int | None  # assigned by the store
    schedule: str
    scheduled_at: float
    fired_at: float
    outcome: str  # started | skipped | queued | failed
    reason: str | None
    run_id: str | None
    missed: bool
    manual: bool
    count: int
    actor: str | None


APPROVAL_STATUSES = ("pending", "approved", "rejected", "expired", "cancelled")


@dataclass(slots=True)
class DefinitionRow:
    def_hash: str
    name: str
    version: str
    source: bytes
    created_at: float


class Store(Protocol):
    async def open(self) -> None:
        """Create the database if needed, bring its schema up to date, start writing."""

    async def close(self) -> None:
        """Finish the commits already requested, then release the database."""

    async def commit(self, batch: Batch) -> None:
        """Write the batch atomically; durable on return. Raises Conflict or StoreError."""

    async def get_run(self, run_id: str) -> RunRow | None: ...

    async def get_runs(self, run_ids: list[str]) -> list[RunRow]:
        """The runs that exist, in the order of `run_ids`."""

    async def get_steps(self, run_id: str) -> list[StepRow]:
        """The run's steps in the order they were first written."""

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
        """Newest first by (created_at, run_id), `since <= created_at < until`.

        Returns a page and the cursor of the next page (None on the last page).
        A cursor this store did not issue raises BadRequest.
        """

    async def history(self, run_id: str, *, after_seq: int = 0, limit: int = 1000) -> list[HistoryRow]:
        """History rows with seq > after_seq, by seq."""

    async def recoverable_runs(self) -> list[RunRow]:
        """Open runs with tasks in flight, or with status in RESUMABLE."""

    async def find_open_run(self, workflow: str, workflow_id: str) -> RunRow | None: ...

    async def due_timers(self, until: float, limit: int) -> list[TimerRow]:
        """Timers with fire_at <= until, earliest first."""

    async def next_timer_at(self) -> float | None: ...

    async def count_timers(self) -> int: ...

    async def put_definition(self, row: DefinitionRow) -> None:
        """Store a definition; a def_hash already stored is left as it is."""

    async def get_definition(self, def_hash: str) -> DefinitionRow | None: ...

    async def list_definitions(self, name: str | None = None) -> list[DefinitionRow]:
        """By name, then oldest first."""

    async def get_event(self, event_key: str) -> EventRow | None: ...

    async def list_dead_letters(self, *, limit: int = 50, before_id: int | None = None) -> list[DeadLetterRow]:
        """Newest first; `before_id` pages backwards."""

    async def get_dead_letter(self, id: int) -> DeadLetterRow | None: ...

    async def outbox_pending(self, limit: int, after_id: int = 0) -> list[OutboxRow]:
        """The oldest rows still stored with an id above `after_id`, by id."""

    async def outbox_rows(self, ids: list[int]) -> list[OutboxRow]:
        """The rows of these ids that are stored, by id."""

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
        """Newest first (by id), `since <= at < until`; `before_id` pages backwards."""

    def iter_runs(
        self,
        *,
        workflow: str | None = None,
        status: str | None = None,
        since: float | None = None,
        until: float | None = None,
        page_size: int = 500,
    ) -> AsyncIterator[list[RunRow]]:
        """Every matching run, OLDEST first by (created_at, run_id), `since <= created_at < until`,
        in pages of at most `page_size` read one at a time (keyset), so memory stays at one
        page whatever the table holds. Each page reads the store as it is at that moment."""

    def iter_history(self, run_ids: list[str], *, types: tuple[str, ...] | None = None,
                     page_size: int = 5000) -> AsyncIterator[list[HistoryRow]]:
        """The history rows of these runs (only `types`, if given), by (run_id, seq), in pages."""

    async def steps_of(self, run_ids: list[str]) -> list[StepRow]:
        """The steps of these runs, by run_id, then in the order they were first written."""

    async def first_history(self, run_ids: list[str], type_: str) -> dict[str, HistoryRow]:
        """Per run, its first history row of this type (runs without one are left out)."""

    async def get_approval(self, id: str) -> ApprovalRow | None: ...

    async def list_approvals(self, *, status: str | None = None, run_id: str | None = None, limit: int = 50,
                             cursor: str | None = None) -> tuple[list[ApprovalRow], str | None]:
        """Newest first by (requested_at, id); a page and the next page's cursor (None on
        the last). A cursor this store did not issue raises BadRequest."""

    async def list_schedules(self) -> list[ScheduleRow]:
        """Every stored schedule, by name."""

    async def list_schedule_fires(self, schedule: str, *, limit: int = 50, before_id: int | None = None) -> list[ScheduleFireRow]:
        """A schedule's fire records, newest first (by id); `before_id` pages backwards."""

    async def open_run_counts(self) -> list[tuple[str, str, int]]:
        """(workflow, status, count) of the open runs (the metrics' gauges, read once at start)."""

    async def waiting_step_counts(self) -> list[tuple[str, str, int]]:
        """(def_hash, step_id, count) of the waiting steps of open runs (read once at start)."""

    async def integrity_check(self) -> str:
        """"ok" when the database is healthy, else the problems found."""

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> int | None:
        """Take the lease `name` for `ttl_s` seconds if it is free or expired, or renew it if
        `holder` holds it; return its fencing token, or None while another holder has it.

        The token grows by one each time the holder changes (a renewal keeps it), so a
        batch fenced with an older token is refused. Of callers racing for a free lease,
        exactly one wins. Expiry is judged by the database's clock where it has one (so
        replicas with skewed clocks agree), else by this process's."""

    async def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up at once if `holder` holds it (it expires now; its token stays
        stored, so the next holder's token is still larger)."""

    async def get_lease(self, name: str) -> tuple[str, int, float] | None:
        """(holder, token, expires_at) of the lease as stored, expired or not; None if never taken."""

    async def list_leases(self, prefix: str = "") -> list[tuple[str, str, int, float, float]]:
        """(name, holder, token, expires_at, now) of the stored leases whose name starts with
        `prefix`, by name; `now` is the clock that judges expiry (the database's, if it has one)."""

    async def drop_lease(self, name: str, holder: str) -> None:
        """Delete the lease's row if `holder` holds it: for leases named after something that
        is gone (a replica that stopped), which would otherwise be listed for ever. The next
        holder of that name starts again at token 1."""

    async def shared_secret(self, name: str, candidate: str) -> str:
        """The secret stored as `name`, storing `candidate` first if there is none: every
        replica on one database gets the same value, whichever asked first."""


# -- list cursors --------------------------------------------------------------


def encode_cursor(created_at: float, run_id: str) -> str:
    """An opaque url-safe token: the (created_at, run_id) the next page starts below."""
    return base64.urlsafe_b64encode(orjson.dumps([created_at, run_id])).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> tuple[float, str]:
    invalid = BadRequest("invalid cursor: pass back the next_cursor of a previous page", field="cursor")
    try:
        raw = base64.b64decode(cursor + "=" * (-len(cursor) % 4), altchars=b"-_", validate=True)
        created_at, run_id = orjson.loads(raw)
    except (binascii.Error, ValueError, TypeError):
        raise invalid from None
    if isinstance(created_at, bool) or not isinstance(created_at, (int, float)) or not isinstance(run_id, str):
        raise invalid
    return float(created_at), run_id
