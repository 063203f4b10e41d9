"""The runtime: events in, decide, commit, then act.

    inbox ──> pump: take a batch of events (many runs) ──> decide each
                    ──> ONE store commit for the whole batch (group commit)
                    ──> dispatch the commands: handlers, timers, children, waiters

Nothing acts before its transition is committed, so a crash anywhere loses no
committed step and re-runs at most the attempts that were in flight (with the same
task ids, hence the same idempotency keys). Runs waiting for a signal or a timer
are not kept in memory: their state is in the store and is loaded when an event
for them arrives. Checks that depend on a run's state (a signal needs a waiting
step, a workflow_id must not name another open run) run inside the pump, so they
are atomic with the decision they guard.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from jsonschema import Draft202012Validator

from handlers import Registry
from server.definitions.catalog import Catalog
from server.definitions.loader import LoadedWorkflow
from server.definitions.models import Workflow
from server.definitions.expressions import Template
from server.engine.commands import (
    CancelChild, CancelTask, CancelTimer, Command, ExecuteTask, Record, RunFinished, StartChild, StartTimer,
)
from server.engine.decide import decide, inflight_commands, new_run, pending_approvals, started_remote_tasks
from server.engine.events import (
    ApprovalDecided, CancelRequested, ChildFinished, ErrorInfo, Event, RetryRequested, SignalReceived, Start,
    TaskFailed,
    TaskHeartbeat, TimerFired, event_to_dict,
)
from server.engine.graph import CompiledWorkflow, compile_workflow, on_queue
from server.engine.state import CANCELLED, COMPENSATED, COMPENSATING, FAILED, QUEUED, RUNNING, RunState
from server.errors import (
    BatonError, Conflict, ExpressionError, InvalidInput, NotFound, RunNotFound, Stale, StoreError, Unavailable,
    WorkflowNotFound,
)
from server.runtime import export
from server.runtime.audit import SYSTEM, audit_row, list_audit
from server.runtime.clock import Clock, SystemClock, iso
from server.telemetry.ids import run_trace_id
from server.telemetry.trace import RunTrace, SpanRecord
from server.runtime.approvals import ApprovalLinks, approval_changes, approval_view, attempt_of, closed_error
from server.runtime.executor import Executor, RunInfo
from server.runtime.lifecycle import lifecycle_rows
from server.runtime.persist import history_rows, load_state, run_row, step_rows
from server.runtime.timers import Timers
from server.telemetry.metrics import Metrics
from server.settings import Limits
from server.store.base import (TERMINAL, Batch, DeadLetterRow, DefinitionRow, HistoryRow, RunRow, StepRow, Store,
                               TimerRow, parse_id)

log = logging.getLogger("baton.runtime")

ORJSON_MAX_DEPTH = 254  # the deepest nesting orjson.dumps writes
MAX_INPUT_DEPTH = 128  # nesting allowed in a run's input, event and signal data (see _require_storable)
# An event whose decision keeps losing the race for its run to other replicas (Stale) is
# decided again from the stored state this many times, then refused as a Conflict.
MAX_STALE_TRIES = 20
MAX_BATCH = 1024  # events decided per commit; bounds the latency one commit adds
# While commits fail, a small write is tried this often (doubling up to the cap): with no
# new work taken, nothing else may commit to tell the runtime that the store is back.
STORE_PROBE_FIRST_S = 0.05
STORE_PROBE_MAX_S = 2.0
Check = Callable[[RunState], Awaitable[Any]]


class _Item:
    __slots__ = ("run_id", "event", "check", "future", "new_state", "tries")

    def __init__(self, run_id: str, event: Event, check: Check | None = None,
                 future: asyncio.Future | None = None, new_state: RunState | None = None) -> None:
        self.run_id, self.event, self.check, self.future, self.new_state = run_id, event, check, future, new_state
        self.tries = 0  # decisions of it that lost the race for a run to another replica (Stale)


_STOP = object()


class _NotPending(Conflict):
    """Raised in the pump when an approval is no longer pending; decide_approval turns it
    into the detailed 409/410 after reading the approval's row."""


class _Admit:
    """A queued run got a concurrency slot: start it now."""

    __slots__ = ("run_id", "at")

    def __init__(self, run_id: str, at: float) -> None:
        self.run_id, self.at = run_id, at


class Runtime:
    def __init__(self, store: Store, catalog: Catalog, registry: Registry, limits: Limits,
                 clock: Clock | None = None) -> None:
        self.store = store
        self.catalog = catalog
        self.clock = clock or SystemClock()
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._cache: dict[str, RunState] = {}
        self._graphs: dict[str, CompiledWorkflow] = {}
        self._validators: dict[str, Draft202012Validator] = {}
        self._waiters: dict[str, list[asyncio.Future]] = {}
        self._open_wids: dict[tuple[str, str], str] = {}
        # workflow `concurrency`: runs holding a slot, and runs queued for one, per (workflow, key)
        self._active: dict[tuple[str, str], set[str]] = {}
        self._queued: dict[tuple[str, str], deque[str]] = {}
        self._slot_keys: dict[str, Template] = {}
        self._pump_task: asyncio.Task | None = None
        self._accepting = False
        self._draining = False  # shutting down: outcomes are still committed, nothing new starts
        self._store_ok = True
        self._store_error = ""  # the last failed commit's message, while the store fails
        # outcomes nobody awaits (handler results, timer firings, child ends) of batches whose
        # commit failed, fed again in order once the store takes writes: a result already
        # paid for is recorded, not run again. Keyed so a timer refired meanwhile is held once.
        self._held: dict[Any, _Item] = {}
        self._held_children: list[tuple[str, int, StartChild]] = []  # child starts the store refused
        self._probe_task: asyncio.Task | None = None
        self.executor = Executor(registry, self.clock, self._submit_internal,
                                 max_tasks=limits.max_concurrent_tasks,
                                 max_tasks_per_workflow=limits.max_concurrent_tasks_per_workflow)
        self.timers = Timers(store, self.clock, self._timer_fired)
        # Prometheus metrics (telemetry/metrics.py): the pump hands it what each commit decided
        self.metrics = Metrics(self)
        # Set by the wiring (server/app.py) when NATS is on:
        # remote: runs the steps that name a `queue` (submit(cmd, run_info), cancel(task_id))
        self.remote: Any = None
        # nats_state: "connected", "reconnecting", ... for readiness
        self.nats_state: Callable[[], str] | None = None
        # lifecycle events: written to the outbox with each transition; outbox_written
        # wakes the publisher after a commit that wrote some
        self.lifecycle = False
        self.outbox_written: Callable[[], None] | None = None
        # triggers: the event-trigger consumer (EventTriggers), which replays dead letters
        self.triggers: Any = None
        # webhooks: the receiver of POST /hooks/<path> (triggers/webhooks.py); None serves no hooks
        self.webhooks: Any = None
        # approvals (runtime/approvals.py): links signs the links (None: requests are stored
        # without one); approval_events writes baton.approval.* to the outbox (NATS on);
        # approval_requested is handed the new requests after their commit (a chat webhook)
        self.approval_links: ApprovalLinks | None = None
        self.approval_events = False
        self.approval_requested: Callable[[list[dict[str, Any]]], None] | None = None
        # scheduler (triggers/scheduler.py): cron and interval triggers; None when not wired
        self.scheduler: Any = None
        # told the run id of each run whose end was just committed (the scheduler's overlap queue)
        self.run_finished: list[Callable[[str], None]] = []
        # run_spans (telemetry/tracing.py): handed each commit's history rows, per run, to make
        # spans of; None when tracing is off
        self.run_spans: Any = None
        # tracer_provider: the OpenTelemetry provider, for API request spans; None when tracing is off
        self.tracer_provider: Any = None
        # cluster (server/cluster.py): set when replicas share a PostgreSQL database. Then every
        # step goes through a JetStream work queue (via the outbox), only the time leader
        # fires timers and schedules and recovers, and runs are not assumed to be ours alone
        self.cluster: Any = None

    # ------------------------------------------------------------- lifecycle

    @property
    def ready(self) -> bool:
        health = self.health()
        return self._accepting and health["store"] == "ok" and health["nats"] in ("connected", "disabled")

    def health(self) -> dict[str, str]:
        return {
            "runtime": "accepting" if self._accepting else "stopped",
            "store": "ok" if self._store_ok else "failing",
            "nats": self.nats_state() if self.nats_state is not None else "disabled",
        }

    async def start(self) -> None:
        now = self.clock.now()
        new = Batch()  # definitions not stored yet, each with its audit entry: one commit, both or neither
        known = {row.def_hash for row in await self.store.list_definitions()}  # one read, not one per version
        for name in self.catalog.names():
            for loaded in self.catalog.versions(name):
                self._graphs[loaded.def_hash] = self._placed(loaded.compiled)
                if loaded.def_hash in known:
                    continue
                known.add(loaded.def_hash)
                source = orjson.dumps(loaded.model.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
                new.definitions.append(DefinitionRow(loaded.def_hash, loaded.model.name, loaded.model.version, source, now))
                new.audit.append(audit_row(now, SYSTEM, "definition.loaded", target=f"workflow:{name}", detail={
                    "version": loaded.model.version, "def_hash": loaded.def_hash, "file": loaded.path}))
        if new.definitions:
            await self.store.commit(new)
        await self.metrics.load(self.store, self._graph)  # open runs and waits, before the pump moves them
        self._pump_task = asyncio.create_task(self._pump(), name="baton-pump")
        if self.cluster is not None:  # the replica that wins the time lease recovers (lead())
            self._accepting = True
            log.info("runtime started as replica %s: %d workflows", self.cluster.replica, len(self.catalog))
            return
        recovered = await self._recover()
        await self.timers.start()
        self._accepting = True
        log.info("runtime started: %d workflows, %d runs recovered, %d timers near", len(self.catalog), recovered, len(self.timers))

    async def stop(self, grace_s: float) -> None:
        self._accepting = False
        self._draining = True
        cancelled = await self.executor.drain(grace_s)
        if cancelled:
            log.warning("%d handler attempts did not finish within %.1fs; they run again after restart", cancelled, grace_s)
        await self.timers.stop()
        if self._probe_task is not None:  # what it holds is re-driven from the store after the restart
            self._probe_task.cancel()
            await asyncio.gather(self._probe_task, return_exceptions=True)
        if self._pump_task is not None:
            self._inbox.put_nowait(_STOP)
            await self._pump_task
        for futures in self._waiters.values():
            for fut in futures:
                if not fut.done():
                    fut.cancel()

    async def lead(self) -> int:
        """This replica won the time lease: recover what is in flight, fire the timers. Other
        replicas arm timers through NATS, and a notice may be lost: the store is read again
        every lease period."""
        self.timers = Timers(self.store, self.clock, self._timer_fired, refill_s=self.cluster.lease_s)
        recovered = await self._recover()
        await self.reconcile_slots()
        await self.timers.start()
        return recovered

    async def follow(self) -> None:
        """This replica lost the time lease (or is stopping): another one fires the timers
        and admits the runs waiting for a concurrency slot."""
        await self.timers.stop()
        self._active, self._queued = {}, {}

    async def sweep(self) -> int:
        """After a replica died: start the child runs whose start it committed but had not
        made yet. Its steps' messages are in the outbox, and their heartbeats stop by themselves."""
        return await self._recover(heartbeats=False)

    async def _recover(self, *, heartbeats: bool = True) -> int:
        counts_slots = self.cluster is None  # in a cluster, the time leader's reconcile_slots does
        if counts_slots:
            await self._recover_slots()
        rows = await self.store.recoverable_runs()
        queued: list[RunState] = []
        for row in rows:
            state = await self._state(row.run_id, row)
            if state is None:
                continue
            if state.status == QUEUED:
                queued.append(state)
                continue
            if self.cluster is None:
                self._cache[state.run_id] = state
                if state.workflow_id and not state.terminal:
                    self._open_wids[(state.workflow, state.workflow_id)] = state.run_id
            self._dispatch(state, inflight_commands(state))
            if heartbeats:
                for task_id in started_remote_tasks(state):  # queued before the timers start firing
                    self._submit_internal(state.run_id, TaskHeartbeat(task_id, self.clock.now()))
        if not counts_slots:
            return len(rows)
        for state in sorted(queued, key=lambda st: (st.created_at or 0.0, st.run_id)):
            self._queued.setdefault((state.workflow, state.slot or ""), deque()).append(state.run_id)
        for key in list(self._queued):
            self._admit(key)
        return len(rows)

    async def _recover_slots(self) -> None:
        """Count the open runs that hold a concurrency slot (waiting ones included)."""
        async for _, row, key in self._limited_runs((RUNNING, COMPENSATING)):
            self._active.setdefault(key, set()).add(row.run_id)

    async def _limited_runs(self, statuses: tuple[str, ...]) -> AsyncIterator[tuple[str, RunRow, tuple[str, str]]]:
        """(status, row, slot key) of the stored runs with these statuses of the workflows
        that have a `concurrency` limit."""
        limited = {w.model.name for n in self.catalog.names() for w in self.catalog.versions(n) if w.model.concurrency}
        for name in sorted(limited):
            for status in statuses:
                cursor = None
                while True:
                    rows, cursor = await self.store.list_runs(workflow=name, status=status, limit=500, cursor=cursor)
                    for row in rows:
                        slot = orjson.loads(row.data).get("slot")
                        if slot is not None:
                            yield status, row, (name, slot)
                    if cursor is None:
                        break

    # ------------------------------------------------------------ operations

    def workflows(self) -> list[dict[str, Any]]:
        return [self._workflow_view(self.catalog.latest(name)) for name in self.catalog.names()]

    def workflow(self, name: str) -> dict[str, Any]:
        loaded = self.catalog.latest(name)
        if loaded is None:
            raise WorkflowNotFound(f"unknown workflow {name!r}", field="name")
        return self._workflow_view(loaded)

    def workflow_versions(self, name: str) -> dict[str, Any]:
        versions = self.catalog.versions(name)
        if not versions:
            raise WorkflowNotFound(f"unknown workflow {name!r}", field="name")
        return {"name": name, "versions": [_version_view(w, w is versions[-1]) for w in versions]}

    def workflow_version(self, name: str, version: str) -> dict[str, Any]:
        versions = self.catalog.versions(name)
        if not versions:
            raise WorkflowNotFound(f"unknown workflow {name!r}", field="name")
        # the first match, as _resolve picks for a run started with this version
        loaded = next((w for w in versions if w.model.version == version), None)
        if loaded is None:
            known = ", ".join(w.model.version for w in versions)
            raise WorkflowNotFound(f"workflow {name!r} has no version {version!r} (loaded: {known})", field="version")
        definition = loaded.model.model_dump(mode="json", exclude_none=True)
        return {"name": name, **_version_view(loaded, loaded is self.catalog.latest(name)), "definition": definition}

    async def start_run(self, workflow: str, input: Any, *, workflow_id: str | None = None, version: str | None = None,
                        event: Any = None, by: str | None = None, run_id: str | None = None,
                        parent: list[str] | None = None) -> tuple[dict[str, Any], bool]:
        self._require_accepting()
        loaded = self._resolve(workflow, version)
        _require_storable(input, "input")
        _require_storable(event, "event")
        self._validate_input(loaded, input)
        state = new_run(run_id or uuid.uuid4().hex, self._graphs[loaded.def_hash])  # placed by start()
        state.parent = parent
        state.slot = self._slot_of(loaded, input, event)
        start = Start(self.clock.now(), input=input, event=event, workflow_id=workflow_id, by=by)

        async def check(st: RunState) -> Any:
            if run_id is not None:
                # a caller-chosen id (an event's, a child's) names one run, once: the
                # cache holds one decided earlier in this batch, the store older ones
                cached = self._cache.get(run_id)
                if cached is not None and cached is not st:
                    return run_row(cached, self.clock.now())
                if (stored := await self.store.get_run(run_id)) is not None:
                    return stored
            if workflow_id is None:
                return None
            existing = await self._open_run_with(loaded.model.name, workflow_id)
            if existing is not None:
                return existing
            self._open_wids[(loaded.model.name, workflow_id)] = st.run_id
            return None

        result = await self._submit(state.run_id, start, check, new_state=state)
        if isinstance(result, RunRow):
            return _summary_row(result), False
        return result, True

    async def signal(self, run_id: str, name: str, payload: Any = None, *, by: str | None = None) -> dict[str, Any]:
        self._require_accepting()
        _require_storable(payload, "data")

        async def check(st: RunState) -> None:
            _require_open(st, f"signal {name!r}")
            if not st.waiting_for(name):
                waiting = ", ".join(sorted(st.signals)) or "none"
                raise Conflict(f"no step of run {st.run_id} is waiting for signal {name!r} (waiting for: {waiting})", field="name")

        return await self._submit(run_id, SignalReceived(name, self.clock.now(), payload, by), check)

    async def cancel(self, run_id: str, *, reason: str = "cancelled", by: str | None = None) -> dict[str, Any]:
        self._require_accepting()
        return await self._cancel(run_id, reason, by)

    async def _cancel(self, run_id: str, reason: str, by: str | None) -> dict[str, Any]:
        async def check(st: RunState) -> None:
            _require_open(st, "cancel")
            if st.status == COMPENSATING:
                raise Conflict(f"run {st.run_id} is already failing and compensating")

        return await self._submit(run_id, CancelRequested(self.clock.now(), reason, by), check)

    async def retry(self, run_id: str, *, by: str | None = None) -> dict[str, Any]:
        self._require_accepting()

        async def check(st: RunState) -> None:
            if st.status not in (FAILED, COMPENSATED, CANCELLED):
                raise Conflict(f"run {st.run_id} is {st.status}: only failed, compensated or cancelled runs can be retried")

        return await self._submit(run_id, RetryRequested(self.clock.now(), by), check)

    async def get_run(self, run_id: str) -> dict[str, Any]:
        row = await self._stored_run(run_id)
        steps = await self.store.get_steps(run_id)
        graph = await self._graph(row.def_hash)
        state = load_state(row, steps, graph)
        detail = _detail(row, state)
        if self.run_spans is not None and self.run_spans.link_trigger:  # its spans are in a trace of its own
            detail["trace_id"] = run_trace_id(run_id, state.event, follow_trigger=False)
        return detail

    async def list_runs(self, **filters: Any) -> tuple[list[dict[str, Any]], str | None]:
        rows, cursor = await self.store.list_runs(**filters)
        return [_summary_row(r) for r in rows], cursor

    async def history(self, run_id: str, *, after_seq: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        await self._stored_run(run_id)
        rows = await self.store.history(run_id, after_seq=after_seq, limit=limit)
        return [{"seq": r.seq, "at": iso(r.at), "type": r.type, "key": r.key, "data": orjson.loads(r.data)} for r in rows]

    async def trace(self, run_id: str) -> dict[str, Any]:
        """The run's spans as its history describes them (server/telemetry/trace.py): what
        the tracing exporter sends, rebuilt from Baton's own records; open spans have no end."""
        row = await self._stored_run(run_id)
        graph = await self._graph(row.def_hash)
        data = orjson.loads(row.data)
        trace = RunTrace(run_id, graph, workflow=row.workflow, version=row.version, workflow_id=row.workflow_id,
                         event=data.get("event"), link_trigger=getattr(self.run_spans, "link_trigger", False))
        spans: list[SpanRecord] = []
        after = 0
        while True:
            page = await self.store.history(run_id, after_seq=after, limit=1000)
            if not page:
                break
            spans += trace.feed([(r.seq, r.at, r.type, r.key, orjson.loads(r.data)) for r in page])
            after = page[-1].seq
        spans += trace.open_spans()
        spans.sort(key=lambda sp: (sp.start, sp.span_id))
        return {"run_id": run_id, "trace_id": trace.trace_id, "spans": [_span_view(sp) for sp in spans]}

    async def wait(self, run_id: str, timeout_s: float) -> dict[str, Any]:
        # Register before reading: a run that finishes while the read is in flight
        # resolves this future instead of being missed (a lost wake-up otherwise).
        fut = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(run_id, []).append(fut)
        try:
            cached = self._cache.get(run_id)
            # A run in flight here needs no store read (a thread hop per /wait, most of the
            # long-poll's cost under load): its end resolves `fut`.
            if cached is None or cached.terminal:
                row = await self._stored_run(run_id)
                if row.status in TERMINAL:
                    return _summary_row(row)
            if self.cluster is not None:  # another replica may decide its end: look in the store too
                return await self._wait_stored(run_id, fut, timeout_s)
            return await asyncio.wait_for(fut, timeout_s)
        except asyncio.TimeoutError:
            # RunNotFound still, for a run that was only in memory and whose first commit failed
            return _summary_row(await self._stored_run(run_id))
        finally:
            waiting = self._waiters.get(run_id)
            if waiting and fut in waiting:
                waiting.remove(fut)
                if not waiting:
                    del self._waiters[run_id]

    async def _wait_stored(self, run_id: str, fut: asyncio.Future, timeout_s: float) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise asyncio.TimeoutError
            done, _ = await asyncio.wait([fut], timeout=min(left, self.cluster.poll_s))
            if done:
                return fut.result()
            row = await self._stored_run(run_id)
            if row.status in TERMINAL:
                return _summary_row(row)

    async def list_dead_letters(self, *, limit: int = 50, cursor: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        before = None if cursor is None else parse_id(cursor, "cursor")
        rows = await self.store.list_dead_letters(limit=limit + 1, before_id=before)
        more = len(rows) > limit
        rows = rows[:limit]
        return [_dead_letter_view(r) for r in rows], (str(rows[-1].id) if more else None)

    async def replay_dead_letter(self, id: int) -> dict[str, Any]:
        self._require_accepting()
        if self.triggers is None:
            raise Unavailable("event triggers are not running (NATS is off)")
        return await self.triggers.replay(id)

    # ---------------------------------------------- audit log and exports (runtime/audit.py, runtime/export.py)

    async def audit(self, actor: str, action: str, *, target: str | None = None, remote: str | None = None,
                    status: int | None = None, request_id: str | None = None,
                    detail: dict[str, Any] | None = None) -> None:
        """Append an entry to the audit log; durable on return. Schedules and anything else
        that changes what Baton does call this too."""
        row = audit_row(self.clock.now(), actor, action, target=target, remote=remote, status=status,
                        request_id=request_id, detail=detail)
        await self.store.commit(Batch(audit=[row]))

    async def list_audit(self, **filters: Any) -> tuple[list[dict[str, Any]], str | None]:
        return await list_audit(self.store, **filters)

    def export_runs(self, **filters: Any) -> AsyncIterator[list[dict[str, Any]]]:
        return export.export_runs(self.store, **filters)

    def export_steps(self, **filters: Any) -> AsyncIterator[list[dict[str, Any]]]:
        return export.export_steps(self.store, self._graph, **filters)

    # ------------------------------------------------- approvals (runtime/approvals.py)

    async def list_approvals(self, *, status: str | None = "pending", run_id: str | None = None, limit: int = 50,
                             cursor: str | None = None, links: bool = False) -> tuple[list[dict[str, Any]], str | None]:
        rows, next_cursor = await self.store.list_approvals(status=status, run_id=run_id, limit=limit, cursor=cursor)
        return [approval_view(r, self.approval_links, with_link=links) for r in rows], next_cursor

    async def get_approval(self, approval_id: str, *, links: bool = False) -> dict[str, Any]:
        return approval_view(await self._approval_row(approval_id), self.approval_links, with_link=links)

    async def approval_for_link(self, token: str) -> dict[str, Any]:
        """The request a link names: 401 if the link is not ours, 410 once it expired."""
        if self.approval_links is None:
            raise Unavailable("approval links are not set up on this server")
        return await self.get_approval(self.approval_links.verify(token, self.clock.now()))

    async def decide_approval(self, approval_id: str, decision: str, *, comment: str | None = None,
                              by: dict[str, Any] | None = None) -> dict[str, Any]:
        """Approve or reject a pending request; Conflict once decided, Gone once expired."""
        self._require_accepting()
        row = await self._approval_row(approval_id)
        attempt = attempt_of(row)

        async def check(st: RunState) -> None:  # in the pump: atomic with the decision
            if (row.key, attempt) not in pending_approvals(st):
                raise _NotPending(f"approval {approval_id} is not pending")  # no store read while every run waits

        event = ApprovalDecided(row.key, attempt, decision, self.clock.now(), by, comment)
        try:
            return await self._submit(row.run_id, event, check)
        except _NotPending:
            # why not (decided, expired, cancelled): read outside the pump
            raise closed_error(await self.store.get_approval(approval_id), approval_id) from None

    async def _approval_row(self, approval_id: str) -> Any:
        row = await self.store.get_approval(approval_id)
        if row is None:
            raise NotFound(f"unknown approval {approval_id!r}", field="id")
        return row

    # -------------------------------------------------------------- the pump

    async def _submit(self, run_id: str, event: Event, check: Check | None = None,
                      new_state: RunState | None = None) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self._inbox.put_nowait(_Item(run_id, event, check, fut, new_state))
        return await fut

    async def report(self, run_id: str, event: Event) -> None:
        """Feed an outcome that arrived from outside (a remote worker) and wait until it
        is committed, so its message can be acknowledged. RunNotFound for an unknown run."""
        await self._submit(run_id, event)

    def _submit_internal(self, run_id: str, event: Event) -> None:
        self._inbox.put_nowait(_Item(run_id, event))

    def _timer_fired(self, run_id: str, timer_id: str) -> None:
        self._submit_internal(run_id, TimerFired(timer_id, self.clock.now(), self.clock.jitter()))

    def inbox_depth(self) -> int:
        """Events waiting for the pump (a metric)."""
        return self._inbox.qsize()

    async def _pump(self) -> None:
        while True:
            items = [await self._inbox.get()]
            while len(items) < MAX_BATCH and not self._inbox.empty():
                items.append(self._inbox.get_nowait())
            stop = any(item is _STOP for item in items)
            items = [item for item in items if item is not _STOP]
            if items:
                try:
                    await self._process(items)
                except Exception:  # the pump must survive anything one batch does
                    log.exception("batch of %d events failed", len(items))
                    for item in items:
                        _fail(item, Unavailable("internal error while processing the request"))
                finally:
                    # these firings are committed (their rows deleted), or lost with the batch:
                    # either way a refill may read their rows again
                    fired = [(i.run_id, i.event.timer_id) for i in items if isinstance(i.event, TimerFired)]
                    self.timers.settled(fired)
            if stop:
                return

    async def _process(self, items: list[_Item]) -> None:
        # One batch for the lot on one node. In a cluster, one per run: another replica may
        # have decided any of them meanwhile, and a stale run must fail alone (the store's
        # group commit still writes the batches in one transaction), not send every other
        # event of the lot round again behind it.
        batches: dict[str, Batch] = {}
        decided: list[tuple[RunState, list[Command], _Item]] = []
        touched: dict[str, RunState] = {}
        requested: list[dict[str, Any]] = []  # approval requests opened by this batch
        timer_ops: dict[tuple[str, str], float | None] = {}
        facts: list[Any] = []  # what each decision leaves for the metrics, counted once committed, as `decided`
        queued_here: list[RunState] = []  # runs stored queued, for the time leader to admit (a cluster's)
        per_run = self.cluster is not None

        def batch_of(run_id: str) -> Batch:
            key = run_id if per_run else ""
            batch = batches.get(key)
            if batch is None:
                batch = batches[key] = Batch()
            return batch

        loaded = await self._load_states([i.run_id for i in items if i.new_state is None and i.run_id not in self._cache])
        for item in items:
            try:
                # a run already decided in this batch continues from that decision, not from the store
                state = (item.new_state or touched.get(item.run_id) or self._cache.get(item.run_id)
                         or loaded.get(item.run_id) or await self._state(item.run_id))
                if state is None:
                    raise RunNotFound(f"unknown run {item.run_id!r}", field="run_id")
                if item.check is not None:
                    early = await item.check(state)
                    if early is not None:
                        _resolve(item, early)
                        continue
            except BatonError as exc:
                _fail(item, exc)
                continue
            if isinstance(item.event, _Admit):
                if state.status != QUEUED or state.queued_start is None:
                    self._release(state)  # cancelled while its admission was on the way
                    continue
                item.event = Start(**{**state.queued_start, "at": item.event.at})
            batch = batch_of(state.run_id)
            if item.new_state is not None and state.slot is not None and not self._take_slot(state):
                self._queue(state, item, batch)
                if self._admits_elsewhere:
                    queued_here.append(state)
                touched[state.run_id] = state
                decided.append((state, [], item))
                facts.append(self.metrics.queued(state))
                continue
            if isinstance(item.event, Start):
                state.queued_start = None
            self._cache[state.run_id] = state  # until the commit: the eviction pass below decides
            before = self.metrics.before(state, item.event, item.new_state is not None)
            _, commands = decide(state, item.event)
            facts.append(self.metrics.after(before, state, item.event, commands))
            batch.history += history_rows(state, item.event.at, item.event, commands)
            if self.lifecycle:
                batch.outbox += lifecycle_rows(state, item.event, commands)
            if self.cluster is not None:  # committed with the decision, sent by whichever replica's outbox
                batch.outbox += [self.cluster.task_row(cmd, self._run_info(state)) for cmd in commands
                                 if isinstance(cmd, ExecuteTask)]
            requested += approval_changes(state, item.event, commands, batch, self.approval_links, self.approval_events)
            if isinstance(item.event, TimerFired):
                timer_ops[(state.run_id, item.event.timer_id)] = None
            for cmd in commands:
                if isinstance(cmd, StartTimer):
                    timer_ops[(state.run_id, cmd.timer_id)] = cmd.fire_at
                elif isinstance(cmd, CancelTimer):
                    timer_ops[(state.run_id, cmd.timer_id)] = None
            touched[state.run_id] = state
            decided.append((state, commands, item))
        if not decided:
            return
        now = self.clock.now()
        for state in touched.values():
            batch = batch_of(state.run_id)
            batch.runs.append(run_row(state, now))
            batch.steps += step_rows(state)
        for (run_id, timer_id), fire_at in timer_ops.items():
            if fire_at is None:
                batch_of(run_id).timers_deleted.append((run_id, timer_id))
            else:
                batch_of(run_id).timers_set.append(TimerRow(run_id, timer_id, fire_at))
        failed = await self._commit(batches)
        if failed:
            for exc, run_ids in failed:  # one call per error: a failing store fails every batch
                self._commit_failed(exc, {r: touched.pop(r) for r in run_ids},
                                    [d for d in decided if d[0].run_id in run_ids])
            lost = {r for _, run_ids in failed for r in run_ids}
            kept = [i for i, d in enumerate(decided) if d[0].run_id not in lost]
            decided, facts = [decided[i] for i in kept], [facts[i] for i in kept]
            requested = [view for view in requested if view["run_id"] not in lost]
            batches = {key: b for key, b in batches.items() if key not in lost}
            queued_here = [state for state in queued_here if state.run_id not in lost]
            if not decided:
                return
        for state in touched.values():
            state.rev += 1  # what the store now holds: the next decision is fenced on it
        if not self._store_ok:
            self._store_recovered()
        # committed: from here a failure must not stop the dispatch below (the tasks and
        # timers of committed decisions), so telemetry's own errors are logged and dropped
        try:
            self.metrics.committed(facts)
        except Exception:
            log.exception("metrics of a committed batch not counted")
        if self.run_spans is not None:
            try:
                rows_of: dict[str, list[HistoryRow]] = {}
                for batch in batches.values():
                    for row in batch.history:
                        rows_of.setdefault(row.run_id, []).append(row)
                for state in touched.values():
                    self.run_spans.committed(state, rows_of.get(state.run_id, []))
            except Exception:
                log.exception("spans of a committed batch not queued")
        if self.outbox_written is not None and any(batch.outbox for batch in batches.values()):
            self.outbox_written()
        if requested and self.approval_requested is not None:
            self.approval_requested(requested)
        for state in queued_here:
            self.cluster.slot_notice("queued", (state.workflow, state.slot), state.run_id)
        for state, commands, item in decided:
            self._dispatch(state, commands)
            if item.future is not None:  # most events are handler outcomes that nobody awaits
                _resolve(item, _summary(state, now))
        for state in touched.values():
            # waiting or done: the store holds it. In a cluster the next event of any run may be
            # decided by another replica, and a state kept here would then lose its next commit
            if state.terminal or not (state.tasks or state.children) or self.cluster is not None:
                self._cache.pop(state.run_id, None)

    async def _commit(self, batches: dict[str, Batch]) -> list[tuple[BatonError, set[str]]]:
        """Commit the batches (at once: the store groups them); return each error met, with
        the runs of the batches it failed. An error that is not the store's goes up."""
        async def commit(batch: Batch) -> BatonError | None:
            try:
                await self.store.commit(batch)
            except BatonError as exc:
                return exc
            return None

        keys = list(batches)
        # one node commits one batch: no task to gather
        outcomes = [await commit(batches[keys[0]])] if len(keys) == 1 else \
            await asyncio.gather(*(commit(batches[k]) for k in keys))
        failed: dict[tuple[type, str], tuple[BatonError, set[str]]] = {}
        for key, outcome in zip(keys, outcomes):
            if outcome is None:
                continue
            exc, run_ids = failed.setdefault((type(outcome), outcome.message), (outcome, set()))
            run_ids.update(run.run_id for run in batches[key].runs)
        return list(failed.values())

    def _commit_failed(self, exc: BatonError, touched: dict[str, RunState],
                       decided: list[tuple[RunState, list[Command], _Item]]) -> None:
        """Memory ran ahead of the store: forget what the batch decided. If the store failed
        (not the batch's data: a Conflict), refuse new work until a write succeeds (the probe
        finds out), and hold the outcomes nobody awaits."""
        failing = isinstance(exc, StoreError)
        if failing:
            self._store_ok, self._store_error = False, exc.message
        stale = isinstance(exc, Stale)
        if stale:  # another replica decided one of these runs first: decide again from the store
            log.info("%s; deciding %d events again", exc.message, len(decided))
        else:
            log.error("commit of %d runs failed: %s", len(touched), exc.message)
        for state in touched.values():
            self._cache.pop(state.run_id, None)
            if state.workflow_id:
                self._open_wids.pop((state.workflow, state.workflow_id), None)
        for state, _, item in decided:
            if item.new_state is not None:
                if state.slot is not None:
                    self._release(state)  # a start never stored holds no concurrency slot
                if stale:  # decide the start afresh: the one made is spent
                    fresh = new_run(state.run_id, state.graph)
                    fresh.parent, fresh.slot = state.parent, state.slot
                    item.new_state = fresh
            if stale and item.tries < MAX_STALE_TRIES:
                item.tries += 1
                self._inbox.put_nowait(item)
                continue
            # a lost heartbeat is replaced by the next one; an awaited event's caller got the error
            elif failing and item.future is None and not isinstance(item.event, TaskHeartbeat):
                key = (item.run_id, item.event.timer_id) if isinstance(item.event, TimerFired) else item
                self._held.setdefault(key, item)
            _fail(item, exc)
        if failing:
            self._start_probe()

    def _start_probe(self) -> None:
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.create_task(self._probe_store(), name="baton-store-probe")

    async def _probe_store(self) -> None:
        """Write one audit row, backing off, until the store takes it: then the held work
        goes on. One `store.recovered` entry per outage says when it ended, and why it began."""
        delay_s = STORE_PROBE_FIRST_S
        failed_at = self.clock.now()
        while True:
            await asyncio.sleep(delay_s)
            row = audit_row(self.clock.now(), SYSTEM, "store.recovered",
                            detail={"failed_at": iso(failed_at), "error": self._store_error})
            try:
                await self.store.commit(Batch(audit=[row]))
            except BatonError as exc:
                self._store_error = exc.message
                delay_s = min(delay_s * 2, STORE_PROBE_MAX_S)
                continue
            self._store_recovered()
            return

    def _store_recovered(self) -> None:
        """A write succeeded: take new work again, feed the held outcomes again (in their
        order; each run is read back from the store), start the refused children."""
        held, self._held = list(self._held.values()), {}
        children, self._held_children = self._held_children, []
        if not self._store_ok or held or children:
            log.warning("the store takes writes again: %d held outcomes and %d child starts resumed",
                        len(held), len(children))
        self._store_ok, self._store_error = True, ""
        for item in held:
            self._inbox.put_nowait(item)
        for parent_id, attempt, cmd in children:
            asyncio.create_task(self._start_child(parent_id, attempt, cmd))

    def _run_info(self, state: RunState) -> RunInfo:
        trace_id = (run_trace_id(state.run_id, state.event, follow_trigger=not self.run_spans.link_trigger)
                    if self.run_spans is not None else None)
        return RunInfo(state.run_id, state.workflow, state.version, state.workflow_id, trace_id, state.event)

    def _placed(self, graph: CompiledWorkflow) -> CompiledWorkflow:
        """A cluster sends in-process steps through its shared work queue (on_queue)."""
        if self.cluster is None:
            return graph
        return on_queue(graph, self.cluster.queue, self.cluster.lease_s)

    @property
    def _timers_front(self) -> Any:
        """Where timers are armed: here, or in a cluster with the time leader (which fires them)."""
        return self.cluster if self.cluster is not None else self.timers

    def _dispatch(self, state: RunState, commands: list[Command]) -> None:
        for cmd in commands:
            if isinstance(cmd, ExecuteTask):
                if self._draining:
                    continue  # it stays in flight in the store and starts after the restart
                if self.cluster is not None:
                    # its message went into the outbox with the decision: the work queue holds
                    # it until a worker takes it, and a started one has a heartbeat deadline
                    continue
                run = self._run_info(state)
                if cmd.queue is None:
                    self.executor.submit(cmd, run)
                elif self.remote is not None:
                    self.remote.submit(cmd, run)
                else:  # its handler lives in a worker that only NATS can reach
                    error = ErrorInfo("QueueUnavailable", f"step needs a worker of queue {cmd.queue!r}, and NATS is disabled", False)
                    self._submit_internal(state.run_id, TaskFailed(cmd.task_id, self.clock.now(), error, self.clock.jitter()))
            elif isinstance(cmd, CancelTask):
                self.executor.cancel(cmd.task_id)
                if self.cluster is not None:
                    self.cluster.cancel(state, cmd.task_id)
                elif self.remote is not None:
                    self.remote.cancel(cmd.task_id)
            elif isinstance(cmd, StartTimer):
                self._timers_front.arm(state.run_id, cmd.timer_id, cmd.fire_at)
            elif isinstance(cmd, CancelTimer):
                self._timers_front.disarm(state.run_id, cmd.timer_id)
            elif isinstance(cmd, StartChild):
                if not self._draining:  # recovery starts it from the committed state otherwise
                    asyncio.create_task(self._start_child(state.run_id, state.attempt, cmd))
            elif isinstance(cmd, CancelChild):
                asyncio.create_task(self._cancel_child(_child_run_id(state.run_id, cmd.key, state.attempt)))
            elif isinstance(cmd, RunFinished):
                self._finished(state, cmd)

    def _finished(self, state: RunState, cmd: RunFinished) -> None:
        if state.workflow_id:
            self._open_wids.pop((state.workflow, state.workflow_id), None)
        if state.slot is not None:
            self._release(state)
        summary = _summary(state, self.clock.now())
        for listener in self.run_finished:
            listener(state.run_id)
        for fut in self._waiters.pop(state.run_id, []):
            if not fut.done():
                fut.set_result(summary)
        if state.parent:
            parent_id, key = state.parent
            error = ErrorInfo(**{k: v for k, v in cmd.error.items() if k in ("type", "message", "retryable", "details")}) if cmd.error else None
            self._submit_internal(parent_id, ChildFinished(key, self.clock.now(), cmd.status, cmd.output, error))

    async def _start_child(self, parent_id: str, attempt: int, cmd: StartChild) -> None:
        child_id = _child_run_id(parent_id, cmd.key, attempt)
        try:
            if await self.store.get_run(child_id) is not None:
                return  # started before a restart; its end will reach the parent
            await self.start_run(cmd.workflow, cmd.input, workflow_id=cmd.workflow_id, run_id=child_id,
                                 parent=[parent_id, cmd.key], by=f"run:{parent_id}")
        except StoreError:  # the store's fault, not the child's: start it once the store is back
            self._held_children.append((parent_id, attempt, cmd))
            self._start_probe()
        except BatonError as exc:
            self._submit_internal(parent_id, ChildFinished(cmd.key, self.clock.now(), FAILED, None,
                                                           ErrorInfo(type(exc).__name__, exc.message, False)))

    async def _cancel_child(self, child_id: str) -> None:
        try:
            await self._cancel(child_id, "parent run stopped", "parent")
        except BatonError:
            pass  # already finished, or never started

    # ----------------------------------------------------------- concurrency

    def _slot_of(self, loaded: LoadedWorkflow, input: Any, event: Any) -> str | None:
        conc = loaded.model.concurrency
        if conc is None:
            return None
        if conc.key is None:
            return ""
        template = self._slot_keys.get(loaded.def_hash)
        if template is None:
            template = self._slot_keys[loaded.def_hash] = Template(conc.key)
        try:
            return str(template.render({"input": input, "event": event}))
        except ExpressionError as exc:
            raise InvalidInput(f"concurrency.key: {exc.message}", field="input") from None

    def at_capacity(self, workflow: str, input: Any, event: Any) -> bool:
        """Would a new run of `workflow` with this input wait for a concurrency slot?"""
        loaded = self.catalog.latest(workflow)
        if loaded is None or loaded.model.concurrency is None:
            return False
        slot = self._slot_of(loaded, input, event)
        return len(self._active.get((workflow, slot), ())) >= loaded.model.concurrency.limit

    def _take_slot(self, state: RunState) -> bool:
        if self._admits_elsewhere:
            return False  # stored queued; the time leader admits it
        limit = state.graph.definition.concurrency.limit
        active = self._active.setdefault((state.workflow, state.slot), set())
        if len(active) >= limit:
            return False
        active.add(state.run_id)
        return True

    def _queue(self, state: RunState, item: _Item, batch: Batch) -> None:
        """Store a run over its workflow's concurrency limit; it starts when a slot frees."""
        start = item.event
        state.input, state.event, state.workflow_id, state.created_at = start.input, start.event, start.workflow_id, start.at
        state.queued_start = event_to_dict(start)
        limit = state.graph.definition.concurrency.limit
        note = Record("run.queued", None, {"slot": state.slot, "limit": limit})
        batch.history += history_rows(state, start.at, None, [note])
        if not self._admits_elsewhere:  # else the leader hears of it once it is stored
            self._queued.setdefault((state.workflow, state.slot), deque()).append(state.run_id)

    @property
    def _admits_elsewhere(self) -> bool:
        """In a cluster, the time leader alone counts the `concurrency` slots and admits the
        runs waiting for one, whichever replica started them: a count per replica would let
        each run `limit` at once."""
        return self.cluster is not None and not self.cluster.leader

    def _release(self, state: RunState) -> None:
        key = (state.workflow, state.slot)
        if self._admits_elsewhere:
            self.cluster.slot_notice("released", key, state.run_id)
        else:
            self.slot_released(key, state.run_id)

    def slot_queued(self, key: tuple[str, str], run_id: str) -> None:
        """A run stored queued (by another replica): wait for a slot, here where they are counted."""
        if run_id in self._active.get(key, ()) or run_id in self._queued.get(key, ()):
            return
        self._queued.setdefault(key, deque()).append(run_id)
        self._admit(key)

    def slot_released(self, key: tuple[str, str], run_id: str) -> None:
        """A run gave its slot up (it ended, or it was cancelled while queued): admit the next."""
        self._active.get(key, set()).discard(run_id)
        waiting = self._queued.get(key)
        if waiting and run_id in waiting:
            waiting.remove(run_id)
        self._admit(key)

    async def reconcile_slots(self) -> None:
        """The time leader of a cluster counts the slots again from the store, and the runs
        queued for one: the other replicas' notices (core NATS) may be lost. What it counted
        itself and the store does not show yet (a start or an admission not committed) stays
        counted; a run the store shows ended gives its slot up. Never more than `limit` at
        once: a slot may stay taken a round too long, not the other way."""
        counted: dict[tuple[str, str], set[str]] = {}
        queued: list[tuple[float, str, tuple[str, str]]] = []
        async for status, row, key in self._limited_runs((RUNNING, COMPENSATING, QUEUED)):
            if status == QUEUED:
                queued.append((row.created_at, row.run_id, key))
            else:
                counted.setdefault(key, set()).add(row.run_id)
        unseen = [r for key, run_ids in self._active.items() for r in run_ids if r not in counted.get(key, ())]
        ended = {row.run_id for row in await self.store.get_runs(unseen) if row.status in TERMINAL} if unseen else set()
        for key, run_ids in self._active.items():  # as it is now, after the reads
            counted.setdefault(key, set()).update(r for r in run_ids if r not in ended)
        waiting: dict[tuple[str, str], deque[str]] = {}
        for _, run_id, key in sorted(queued):
            if run_id not in counted.get(key, ()):
                waiting.setdefault(key, deque()).append(run_id)
        for key, run_ids in self._queued.items():  # queued here, not committed yet
            known = waiting.setdefault(key, deque())
            known.extend(r for r in run_ids if r not in known and r not in counted.get(key, ()))
        self._active, self._queued = counted, {key: w for key, w in waiting.items() if w}
        for key in list(self._queued):
            self._admit(key)

    def _admit(self, key: tuple[str, str]) -> None:
        waiting = self._queued.get(key)
        limit = None
        while waiting:
            if limit is None:
                loaded = self.catalog.latest(key[0])
                limit = loaded.model.concurrency.limit if loaded and loaded.model.concurrency else 1
            active = self._active.setdefault(key, set())
            if len(active) >= limit:
                return
            run_id = waiting.popleft()
            active.add(run_id)
            self._inbox.put_nowait(_Item(run_id, _Admit(run_id, self.clock.now())))
        self._queued.pop(key, None)

    # --------------------------------------------------------------- helpers

    async def _load_states(self, run_ids: list[str]) -> dict[str, RunState]:
        """The stored states of these runs in two reads, not two per run: waiting runs live
        only in the store, and a burst of their timers or signals would otherwise read them
        one by one inside the pump. A failing read leaves each run to `_state` (and its error)."""
        if not run_ids:
            return {}
        try:
            rows = await self.store.get_runs(run_ids)
            steps: dict[str, list[StepRow]] = {}
            for step in await self.store.steps_of([r.run_id for r in rows]):
                steps.setdefault(step.run_id, []).append(step)
            return {row.run_id: load_state(row, steps.get(row.run_id, []), await self._graph(row.def_hash))
                    for row in rows}
        except BatonError:
            return {}

    async def _stored_run(self, run_id: str) -> RunRow:
        row = await self.store.get_run(run_id)
        if row is None:
            raise RunNotFound(f"unknown run {run_id!r}", field="run_id")
        return row

    async def _state(self, run_id: str, row: RunRow | None = None) -> RunState | None:
        state = self._cache.get(run_id)
        if state is not None:
            return state
        row = row or await self.store.get_run(run_id)
        if row is None:
            return None
        graph = await self._graph(row.def_hash)
        return load_state(row, await self.store.get_steps(run_id), graph)

    async def graph_of(self, def_hash: str) -> CompiledWorkflow:
        """A definition by hash (a run's own version), loaded from the store if not in the catalog."""
        return await self._graph(def_hash)

    async def _graph(self, def_hash: str) -> CompiledWorkflow:
        graph = self._graphs.get(def_hash)
        if graph is None:  # a run pinned to a version no longer in the files
            row = await self.store.get_definition(def_hash)
            if row is None:
                raise WorkflowNotFound(f"definition {def_hash[:12]} is not stored")
            graph = self._placed(compile_workflow(Workflow.model_validate(orjson.loads(row.source)), def_hash))
            self._graphs[def_hash] = graph
        return graph

    async def _open_run_with(self, workflow: str, workflow_id: str) -> RunRow | None:
        # in a cluster another replica may have ended that run: only the store knows
        run_id = self._open_wids.get((workflow, workflow_id)) if self.cluster is None else None
        if run_id is not None:
            cached = self._cache.get(run_id)
            if cached is not None and not cached.terminal:
                return run_row(cached, self.clock.now())
        row = await self.store.find_open_run(workflow, workflow_id)
        return row

    def _resolve(self, name: str, version: str | None) -> LoadedWorkflow:
        if version is None:
            loaded = self.catalog.latest(name)
        else:
            loaded = next((w for w in self.catalog.versions(name) if w.model.version == str(version)), None)
        if loaded is None:
            known = ", ".join(self.catalog.names()) or "none"
            what = f"{name!r}" if version is None else f"{name!r} version {version!r}"
            raise WorkflowNotFound(f"unknown workflow {what} (known: {known})", field="workflow")
        return loaded

    def _validate_input(self, loaded: LoadedWorkflow, input: Any) -> None:
        schema = loaded.model.input_schema
        if schema is None:
            return
        validator = self._validators.get(loaded.def_hash)
        if validator is None:
            validator = self._validators[loaded.def_hash] = Draft202012Validator(schema)
        errors = sorted(validator.iter_errors(input), key=lambda e: [str(p) for p in e.absolute_path])
        if errors:
            error = errors[0]
            parts = list(error.absolute_path)
            if error.validator == "required" and isinstance(error.instance, dict):
                parts += [next(p for p in error.validator_value if p not in error.instance)]
            path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)
            more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
            raise InvalidInput(f"input{path}: {error.message}{more}", field=f"input{path}")

    def _require_accepting(self) -> None:
        if not self._accepting:
            raise Unavailable("Baton is not accepting work (starting up or shutting down)")
        if not self._store_ok:  # what it cannot record, it does not take
            raise StoreError(f"Baton takes no new work while its store fails: {self._store_error}")

    def _workflow_view(self, loaded: LoadedWorkflow) -> dict[str, Any]:
        model = loaded.model
        return {
            "name": model.name, "version": model.version, "def_hash": loaded.def_hash,
            "description": model.description, "steps": [s.id for s in model.steps],
            "input_schema": model.input_schema,
            "versions": [w.model.version for w in self.catalog.versions(model.name)],
        }


def _require_storable(value: Any, field: str) -> None:
    """History and run state keep values as JSON, which orjson writes at most 254 levels
    deep (its parser reads 1024). A value from outside may nest MAX_INPUT_DEPTH levels:
    the rest is room for what the run wraps around it (state, step outputs, history).
    Found deeper at the commit, it would fail the whole batch with it (a 503 for all)."""
    if not isinstance(value, (dict, list)):
        return
    _DEPTH_PROBE_END[:] = [value]  # the probe is MAX_INPUT_DEPTH levels short of orjson's limit
    try:
        orjson.dumps(_DEPTH_PROBE)  # the same answer as measuring the depth, at orjson's speed
    except TypeError as exc:
        raise InvalidInput(f"{field} cannot be stored as JSON ({exc}): it may nest at most {MAX_INPUT_DEPTH} "
                           "levels deep", field=field) from None
    finally:
        _DEPTH_PROBE_END.clear()


def _depth_probe() -> tuple[list, list]:
    """Lists nested ORJSON_MAX_DEPTH - MAX_INPUT_DEPTH deep, and the innermost one."""
    outer = end = []
    for _ in range(ORJSON_MAX_DEPTH - MAX_INPUT_DEPTH - 1):
        inner: list = []
        end.append(inner)
        end = inner
    return outer, end


_DEPTH_PROBE, _DEPTH_PROBE_END = _depth_probe()


def _require_open(state: RunState, what: str) -> None:
    if state.terminal:
        raise Conflict(f"cannot {what}: run {state.run_id} is already {state.status}")


def _resolve(item: _Item, value: Any) -> None:
    if item.future is not None and not item.future.done():
        item.future.set_result(value)


def _fail(item: _Item, exc: BaseException) -> None:
    if item.future is not None and not item.future.done():
        item.future.set_exception(exc)


def _child_run_id(parent_id: str, key: str, attempt: int) -> str:
    digest = hashlib.sha1(f"{key}:{attempt}".encode()).hexdigest()[:8]
    return f"{parent_id}-{re.sub(r'[^A-Za-z0-9_-]', '_', key)[:40]}-{digest}"


def _summary(state: RunState, updated_at: float) -> dict[str, Any]:
    return {
        "run_id": state.run_id, "workflow": state.workflow, "version": state.version,
        "workflow_id": state.workflow_id, "status": state.status, "attempt": state.attempt,
        "created_at": iso(state.created_at), "updated_at": iso(updated_at), "finished_at": iso(state.finished_at),
    }


def _summary_row(row: RunRow) -> dict[str, Any]:
    return {
        "run_id": row.run_id, "workflow": row.workflow, "version": row.version, "workflow_id": row.workflow_id,
        "status": row.status, "attempt": orjson.loads(row.data).get("attempt", 0),
        "created_at": iso(row.created_at), "updated_at": iso(row.updated_at), "finished_at": iso(row.finished_at),
    }


def _detail(row: RunRow, state: RunState) -> dict[str, Any]:
    nodes = state.graph.nodes
    steps = []
    for key, st in state.steps.items():
        duration = st.finished_at - st.started_at if st.finished_at and st.started_at else None
        steps.append({
            "key": key, "step_id": st.step_id, "kind": nodes[st.step_id].kind, "status": st.status,
            "attempt": st.attempt, "output": st.output, "error": st.error,
            "started_at": iso(st.started_at), "finished_at": iso(st.finished_at),
            "duration_s": round(duration, 6) if duration is not None else None,
            "compensation": None if st.compensation is None else
            {"status": st.compensation, "attempt": st.comp_attempt, "error": st.comp_error},
        })
    return {
        **_summary_row(row), "input": state.input, "output": state.output, "error": state.error,
        "waiting_for": sorted(state.signals) + [f"approval:{key}" for key, _ in pending_approvals(state)],
        "steps": steps,
        # the trace its spans are in (exported or not): the trigger's, else one derived from the run id
        "trace_id": run_trace_id(state.run_id, state.event),
    }


def _version_view(loaded: LoadedWorkflow, latest: bool) -> dict[str, Any]:
    return {"version": loaded.model.version, "def_hash": loaded.def_hash, "latest": latest,
            "description": loaded.model.description}


def _dead_letter_view(row: DeadLetterRow) -> dict[str, Any]:
    try:
        data: Any = orjson.loads(row.data) if row.data else None
    except orjson.JSONDecodeError:
        data = row.data.decode("utf-8", errors="replace")
    return {"id": row.id, "at": iso(row.at), "subject": row.subject, "event_key": row.event_key,
            "workflow": row.workflow, "error": row.error, "headers": orjson.loads(row.headers), "data": data,
            "replayed_at": iso(row.replayed_at), "replay_run": row.replay_run}


def _span_view(span: SpanRecord) -> dict[str, Any]:
    return {"span_id": span.span_id, "parent_id": span.parent_id, "name": span.name, "kind": span.kind,
            "start": iso(span.start), "end": iso(span.end), "duration_s": None if span.end is None else round(span.end - span.start, 6),
            "status": span.status, "message": span.message, "attributes": span.attributes,
            "events": [{"name": name, "at": iso(at), "attributes": attrs} for name, at, attrs in span.events]}
