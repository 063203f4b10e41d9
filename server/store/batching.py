"""What both stores share: a group of batches as one write plan, the writer's queue items
and counters, and the numbered migrations.

`make_plan` turns a group of batches into one parameter list per table and statement
kind, so a store writes a whole group with one statement (or executemany) per kind.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from server.errors import Stale, StoreError
from server.store.base import Batch, DefinitionRow

RUN_COLUMNS = (
    "run_id, workflow, version, def_hash, workflow_id, status,"
    " created_at, updated_at, finished_at, inflight, data, rev"
)
STEP_COLUMNS = "run_id, key, step_id, status, attempt, started_at, finished_at, data"
HISTORY_COLUMNS = "run_id, seq, at, type, key, data"
TIMER_COLUMNS = "run_id, timer_id, fire_at"
DEFINITION_COLUMNS = "def_hash, name, version, source, created_at"
EVENT_COLUMNS = "event_key, subject, received_at, outcome, runs"
DEAD_LETTER_COLUMNS = "id, at, subject, event_key, workflow, error, headers, data, replayed_at, replay_run"
OUTBOX_COLUMNS = "id, subject, msg_id, headers, data"
APPROVAL_COLUMNS = (
    "id, run_id, key, step_id, status, requested_at, expires_at, decided_at, decided_by, decided_via, comment, data"
)
APPROVAL_CLOSED_COLUMNS = "status, decided_at, decided_by, decided_via, comment, id"
AUDIT_COLUMNS = "id, at, actor, action, target, remote, status, request_id, detail"
SCHEDULE_COLUMNS = (
    "name, workflow, spec_hash, next_at, paused, paused_by, paused_at, pause_note,"
    " last_fire_at, last_run_id, last_outcome, queued, updated_at"
)
SCHEDULE_FIRE_COLUMNS = "id, schedule, scheduled_at, fired_at, outcome, reason, run_id, missed, manual, count, actor"


def getter(columns: str) -> Callable[[Any], tuple]:
    return attrgetter(*(name.strip() for name in columns.split(",")))


run_params = getter(RUN_COLUMNS)
step_params = getter(STEP_COLUMNS)
history_params = getter(HISTORY_COLUMNS)
timer_params = getter(TIMER_COLUMNS)
definition_params = getter(DEFINITION_COLUMNS)
event_params = getter(EVENT_COLUMNS)
dead_letter_params = getter(DEAD_LETTER_COLUMNS)
outbox_params = getter(OUTBOX_COLUMNS)
approval_params = getter(APPROVAL_COLUMNS)
approval_closed_params = getter(APPROVAL_CLOSED_COLUMNS)
audit_params = getter(AUDIT_COLUMNS)
schedule_params = getter(SCHEDULE_COLUMNS)
schedule_fire_params = getter(SCHEDULE_FIRE_COLUMNS)
# what a schedules upsert writes over a stored row: not the name, not the pause columns
SCHEDULE_UPDATE_COLUMNS = [c.strip() for c in SCHEDULE_COLUMNS.split(",")
                           if c.strip() not in ("name", "paused", "paused_by", "paused_at", "pause_note")]


def schedule_pause_params(row: Any) -> tuple:
    """A pause writes the pause columns; a resume also its next_at (None: leave it)."""
    next_at = None if row.paused else row.next_at
    return (row.paused, row.paused_by, row.paused_at, row.pause_note, next_at, row.updated_at, row.name)


@dataclass(slots=True)
class Plan:
    fences: list[tuple[str, str, int]]  # leases to check first
    statements: list[tuple[str, list[tuple]]]  # (kind, parameter tuples); kind names the table and operation
    check_revs: bool  # runs are written only over the rev they carry


def make_plan(items: Iterable[Batch | DefinitionRow], check_revs: bool = False) -> Plan:
    """The fences to check, then one (kind, parameters) per table and statement kind,
    in execution order; each store has one statement per kind.

    The result equals committing the batches one after another. Runs and history
    keep every row, in commit order. Steps and timers keep the net effect per key:
    the last upsert, or a delete if a delete came last. A delete also forgets the
    key's earlier upserts, so a step deleted and written again is re-inserted
    (and listed) last. Deletes run first: they remove rows that existed before
    the group, or rows that a later upsert in the group writes afresh.
    """
    runs: list[tuple] = []
    history: list[tuple] = []
    definitions: list[tuple] = []
    steps: dict[tuple[str, str], tuple] = {}
    steps_deleted: set[tuple[str, str]] = set()
    timers: dict[tuple[str, str], tuple] = {}
    timers_deleted: set[tuple[str, str]] = set()
    outbox: list[tuple] = []
    outbox_deleted: list[tuple] = []
    events: list[tuple] = []
    events_pruned: list[tuple] = []
    dead_letters: list[tuple] = []
    replayed: list[tuple] = []
    approvals: list[tuple] = []
    approvals_closed: list[tuple] = []
    audit: list[tuple] = []
    schedules: dict[str, tuple] = {}
    pauses: dict[str, tuple] = {}
    schedule_fires: list[tuple] = []
    fires_pruned: list[tuple] = []
    fences: list[tuple[str, str, int]] = []
    for item in items:
        if isinstance(item, DefinitionRow):
            definitions.append(definition_params(item))
            continue
        if item.fence is not None:
            fences.append(item.fence)
        runs.extend(map(run_params, item.runs))
        history.extend(map(history_params, item.history))
        for step in item.steps:
            steps[step.run_id, step.key] = step_params(step)
        for run_id, key in item.steps_deleted:
            steps.pop((run_id, key), None)
            steps_deleted.add((run_id, key))
        for timer in item.timers_set:
            timers[timer.run_id, timer.timer_id] = timer_params(timer)
        for run_id, timer_id in item.timers_deleted:
            timers.pop((run_id, timer_id), None)
            timers_deleted.add((run_id, timer_id))
        outbox.extend(map(outbox_params, item.outbox))
        outbox_deleted.extend((id_,) for id_ in item.outbox_deleted)
        events.extend(map(event_params, item.events))
        if item.events_pruned_before is not None:
            events_pruned.append((item.events_pruned_before,))
        dead_letters.extend(map(dead_letter_params, item.dead_letters))
        replayed.extend((at, run_id, id_) for id_, at, run_id in item.dead_letters_replayed)
        approvals.extend(map(approval_params, item.approvals))
        approvals_closed.extend(map(approval_closed_params, item.approvals_closed))
        audit.extend(map(audit_params, item.audit))
        definitions.extend(map(definition_params, item.definitions))
        for row in item.schedules:
            schedules[row.name] = schedule_params(row)
            if row.name in pauses:  # a fire after a resume: its next_at is the newer one
                pauses[row.name] = pauses[row.name][:4] + (None,) + pauses[row.name][5:]
        for row in item.schedule_pauses:
            earlier = pauses.get(row.name)
            params = schedule_pause_params(row)
            if params[4] is None and earlier is not None:  # a pause after a resume keeps its next_at
                params = params[:4] + (earlier[4],) + params[5:]
            pauses[row.name] = params
        schedule_fires.extend(map(schedule_fire_params, item.schedule_fires))
        fires_pruned.extend(item.schedule_fires_pruned)
    statements = [
        ("steps_deleted", list(steps_deleted)),
        ("timers_deleted", list(timers_deleted)),
        ("runs", runs),
        ("steps", list(steps.values())),
        ("history", history),
        ("timers", list(timers.values())),
        ("definitions", definitions),
        ("outbox", outbox),
        ("outbox_deleted", outbox_deleted),
        ("events_pruned", events_pruned),
        ("events", events),
        ("dead_letters", dead_letters),
        ("dead_letters_replayed", replayed),
        ("approvals", approvals),
        ("approvals_closed", approvals_closed),
        ("audit", audit),
        ("schedules", list(schedules.values())),
        ("schedule_pauses", list(pauses.values())),
        ("schedule_fires", schedule_fires),
        ("schedule_fires_pruned", fires_pruned),
    ]
    return Plan(fences, [(kind, params) for kind, params in statements if params], check_revs)


def stale_run(stored: dict[str, int], written: list[tuple[str, int]]) -> Stale:
    """Stale for the first (run_id, rev) of `written` that does not follow `stored`
    (run_id: rev before the writes) once the rows before it are applied."""
    revs = dict(stored)
    for run_id, rev in written:
        if revs.get(run_id, 0) != rev or (rev > 0 and run_id not in revs):
            return Stale(f"run {run_id} was changed by another decision (expected revision {rev})", run_id=run_id)
        revs[run_id] = rev + 1
    return Stale("a run was changed by another decision")  # written meanwhile by another process


@dataclass(slots=True)
class Pending:
    item: Batch | DefinitionRow
    future: asyncio.Future[None]


STOP = object()


@dataclass(slots=True)
class StoreStats:
    """Writer counters, for tests and metrics."""

    groups: int = 0  # writer rounds, each taking all that was queued
    transactions: int = 0  # transactions committed
    batches: int = 0  # batches (and definitions) committed
    retried_groups: int = 0  # rollbacks for one batch's data (the rest then retried)
    failed_batches: int = 0  # batches whose caller got an error
    largest_group: int = 0


# Bigger groups gain little throughput and hold every caller in them longer.
MAX_GROUP_BATCHES = 512


class GroupWriter:
    """The group commit both stores share (its reasons: server/store/sqlite.py's docstring).

    `commit()` only enqueues; one writer task takes everything queued (up to
    MAX_GROUP_BATCHES), writes it as one transaction (`_transaction`), then resolves every
    caller. A group that fails because of one batch's data (`_is_batch_error`) fails that
    batch alone: a stale run names its batch, and the rest is tried again as one group
    (replicas racing for runs make this common); after any other batch error, each batch is
    tried in its own transaction. A failure of the database itself fails the whole group.
    A store sets `where` (for messages), `stats`, `on_group`, and starts `_write_loop` on
    `_queue` as `_writer`."""

    where: str
    stats: StoreStats
    on_group: Callable[[int, float], None] | None
    _queue: asyncio.Queue[Pending | object] | None
    _writer: asyncio.Task[None] | None

    async def _transaction(self, items: Iterable[Batch | DefinitionRow]) -> None:
        raise NotImplementedError

    def _is_batch_error(self, exc: BaseException) -> bool:
        raise NotImplementedError

    def _caller_error(self, exc: BaseException) -> BaseException:
        """What a caller gets for `exc` (the driver's exception mapped); one instance per caller."""
        raise NotImplementedError

    async def commit(self, batch: Batch) -> None:
        await self._enqueue(batch)

    async def put_definition(self, row: DefinitionRow) -> None:
        # Through the writer like a batch, so writes never interleave.
        await self._enqueue(row)

    async def _enqueue(self, item: Batch | DefinitionRow) -> None:
        if self._writer is None or self._writer.done() or self._queue is None:
            raise StoreError(f"the store is not open: {self.where}")
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(Pending(item, future))
        await future

    async def _write_loop(self, queue: asyncio.Queue[Pending | object]) -> None:
        while True:
            group = [await queue.get()]
            while len(group) < MAX_GROUP_BATCHES and not queue.empty():
                group.append(queue.get_nowait())
            # A caller that gave up before its batch was taken was promised nothing;
            # skipping its batch keeps "cancelled" meaning "not written".
            pending = [p for p in group if isinstance(p, Pending) and not p.future.done()]
            if pending:
                try:
                    await self._write_group(pending)
                except BaseException as exc:  # cancelled: nobody may wait forever
                    queued = (queue.get_nowait() for _ in range(queue.qsize()))
                    for p in [*pending, *(q for q in queued if isinstance(q, Pending))]:
                        self._failed([p], StoreError(f"the store writer stopped: {exc!r}"))
                    raise
            if any(item is STOP for item in group):
                return

    async def _write_group(self, pending: list[Pending]) -> None:
        self.stats.groups += 1
        self.stats.largest_group = max(self.stats.largest_group, len(pending))
        started = time.perf_counter()
        while True:
            try:
                await self._transaction(p.item for p in pending)
            except Exception as exc:
                if len(pending) == 1 or not self._is_batch_error(exc):
                    self._failed(pending, exc)
                    return
                self.stats.retried_groups += 1
                culprit = _stale_batch(exc, pending)
                if culprit is None:
                    break
                self._failed([culprit], exc)  # each pass drops one batch: at most len(pending) passes
                pending = [p for p in pending if p is not culprit]
                continue
            if self.on_group is not None:
                self.on_group(len(pending), time.perf_counter() - started)
            self._succeeded(pending)
            return
        for p in pending:
            try:
                await self._transaction([p.item])
            except Exception as one_exc:
                self._failed([p], one_exc)
            else:
                self._succeeded([p])

    def _succeeded(self, pending: list[Pending]) -> None:
        self.stats.transactions += 1
        self.stats.batches += len(pending)
        for p in pending:
            if not p.future.done():
                p.future.set_result(None)

    def _failed(self, pending: list[Pending], exc: BaseException) -> None:
        self.stats.failed_batches += len(pending)
        for p in pending:
            if not p.future.done():
                p.future.set_exception(self._caller_error(exc))


def _stale_batch(exc: BaseException, pending: list[Pending]) -> Pending | None:
    """The first batch that writes the run a Stale names, if it names one."""
    run_id = exc.run_id if isinstance(exc, Stale) else None
    if run_id is None:
        return None
    return next((p for p in pending if isinstance(p.item, Batch) and any(r.run_id == run_id for r in p.item.runs)),
                None)


MIGRATION_FILE = re.compile(r"^(\d{4})_\w+\.sql$")


def migrations(package: str) -> list[tuple[int, str]]:
    """(version, script) of a package's migrations, numbered 1..N without gaps."""
    found = []
    for entry in importlib.resources.files(package).iterdir():
        if match := MIGRATION_FILE.match(entry.name):
            found.append((int(match.group(1)), entry.read_text(encoding="utf-8")))
    found.sort()
    if [version for version, _ in found] != list(range(1, len(found) + 1)):
        raise StoreError(f"migrations must be numbered 0001, 0002, ... without gaps, found {[v for v, _ in found]}")
    return found
