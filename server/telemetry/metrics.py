"""Prometheus metrics of one runtime: what ran, how it went, and what is waiting now.

Rules, and why:
* One `CollectorRegistry` per runtime, never the process-wide default: a test process
  opens several runtimes, and a server must expose only its own.
* Counters move after a commit, from what the committed batch decided (the events
  and commands the pump already holds, not history JSON), so a batch whose commit
  fails counts nothing. The pump pays one small tuple per decision; the label
  lookups happen once per batch, after the commit.
* State is read when Prometheus scrapes, so nothing polls: queue depths and armed
  timers from the runtime's memory (a custom collector), stored timers and the event
  consumer's lag by `refresh()` just before the scrape. Open runs and waiting steps
  would need a scan of every open run at each scrape, so they are counts the pump
  moves with each decision, read from the store once at start (`load`): right after
  a restart. Counters restart at zero; Prometheus' rate() takes resets in its stride.
* Labels are bounded by the definitions: workflow name, step id (a map iteration's
  steps share their id), schedule name, and outcomes or kinds from fixed sets. Never
  a run id.
* Step attempts are timed from the decision that scheduled them to the one that
  took their outcome (queueing included, as a user waits for it), on the runtime's
  clock. An attempt scheduled before this process started is not timed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry, Counter, Histogram, PlatformCollector, ProcessCollector, disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from server.engine.commands import CancelTask, CancelTimer, ExecuteTask, Record, RunFinished, StartTimer
from server.engine.events import ApprovalDecided, RetryRequested, Start, TaskFailed, TaskSucceeded, TimerFired
from server.engine.graph import CompiledWorkflow
from server.engine.state import COMPENSATING, QUEUED, RUNNING, TERMINAL, RunState
from server.errors import BatonError

log = logging.getLogger("baton.metrics")

# No `<name>_created` series beside each counter and histogram: the text format turns them
# into series of their own, doubling what Prometheus stores for nothing rate() needs.
disable_created_metrics()

OPEN = (QUEUED, RUNNING, COMPENSATING)
WAIT_KINDS = ("signal", "approval", "sleep")
# timer kind (the timer id up to its first ":") -> the `kind` label of baton_timeouts_total
TIMEOUT_KINDS = {"timeout": "step", "ctimeout": "compensation", "run-timeout": "run", "signal": "signal",
                 "approval": "approval", "heartbeat": "heartbeat", "cheartbeat": "heartbeat"}
# Steps run from milliseconds (a no-op) to hours (a backfill): the buckets span both.
STEP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600)
COMMIT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # the store groups at most 512 batches
REFRESH_TIMEOUT_S = 2.0  # a store or NATS read at scrape time gives up after this; the gauge is left out

GraphOf = Callable[[str], Awaitable[CompiledWorkflow]]
# what one decision leaves for `committed`:
# (workflow, run_id, event, commands, status before (None: a new run), status after, change in signal waits,
#  the event is a timer that fired while armed)
Fact = tuple[str, str, Any, list, "str | None", str, int, bool]


class _Labelled:
    """`metric.labels(*values)`, memoised: the library call checks and locks (~2 µs)."""

    __slots__ = ("metric", "children")

    def __init__(self, metric: Any) -> None:
        self.metric, self.children = metric, {}

    def __call__(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self.metric.labels(*values)
        return child


def _signal_waits(state: RunState) -> int:
    return sum(map(len, state.signals.values())) if state.signals else 0


def _step_of(key: str) -> str:
    return key.rpartition("/")[2]  # `each[3]/load` -> `load`


class Metrics:
    """The metrics of one runtime. `runtime` gives the state read at scrape time: its
    `inbox_depth()`, `executor`, `timers`, `store` and `triggers` (None without NATS)."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self.registry = CollectorRegistry()
        r = self.registry
        self.runs_started = _Labelled(Counter(
            "baton_runs_started", "Runs started (a run that waited for a concurrency slot counts when it got one)",
            ["workflow"], registry=r))
        self.runs_finished = _Labelled(Counter(
            "baton_runs_finished", "Runs ended, by outcome: succeeded, failed, compensated, cancelled",
            ["workflow", "outcome"], registry=r))
        self.run_retries = _Labelled(Counter(
            "baton_run_retries", "Failed, compensated or cancelled runs retried from their failed step",
            ["workflow"], registry=r))
        self.step_retries = _Labelled(Counter(
            "baton_step_retries", "Step attempts that failed and were scheduled again by the retry policy",
            ["workflow", "step"], registry=r))
        self.timeouts = _Labelled(Counter(
            "baton_timeouts", "Deadlines that passed, by kind: step, compensation, run, signal, approval, heartbeat",
            ["workflow", "kind"], registry=r))
        self.step_seconds = _Labelled(Histogram(
            "baton_step_duration_seconds",
            "Step attempts (handler tasks), from scheduling to outcome: succeeded, failed, timed_out, cancelled",
            ["workflow", "step", "outcome"], buckets=STEP_BUCKETS_S, registry=r))
        self.dead_letters = _Labelled(Counter(
            "baton_dead_letters", "Events that could not start a run, recorded and published to baton.dlq.* "
            "(workflow empty: the event could not be read)", ["workflow"], registry=r))
        self.event_redeliveries = Counter(
            "baton_event_redeliveries", "Trigger events JetStream delivered more than once (after a nak or a crash)",
            registry=r)
        self.schedule_fires = _Labelled(Counter(
            "baton_schedule_fires", "Fires of cron and interval triggers, by outcome: started, skipped, queued, failed",
            ["schedule", "outcome"], registry=r))
        self.commit_seconds = Histogram(
            "baton_store_commit_seconds", "Time to write one group commit (one transaction)",
            buckets=COMMIT_BUCKETS_S, registry=r)
        self.commit_batches = Histogram(
            "baton_store_commit_batches", "Batches (each one pump round or API write) per group commit",
            buckets=BATCH_BUCKETS, registry=r)
        # state the pump moves with each committed decision; `load` reads it from the store at start
        self.runs_open: Tally[tuple[str, str]] = Tally()  # (workflow, status)
        self.waits: Tally[tuple[str, str]] = Tally()  # (workflow, kind)
        self._attempts: dict[str, tuple[float, str]] = {}  # step task in flight -> (scheduled at, step id)
        self._refreshed: dict[str, Any] = {}
        r.register(_StateCollector(self))
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)

    # --------------------------------------------------------------- at start

    async def load(self, store: Any, graph_of: GraphOf) -> None:
        """Open runs and waiting steps as the store has them: call before the pump starts.
        Every loaded workflow shows from the start, at 0, so a dashboard has no gaps."""
        self.runs_open.clear()
        self.waits.clear()
        catalog = self.runtime.catalog
        for name in catalog.names():
            for status in OPEN:
                self.runs_open[name, status] += 0
            for node in catalog.latest(name).compiled.nodes.values():
                if (kind := _wait_kind(node)) is not None:
                    self.waits[name, kind] += 0
        for workflow, status, count in await store.open_run_counts():
            self.runs_open[workflow, status] = count
        graphs: dict[str, CompiledWorkflow | None] = {}
        for def_hash, step_id, count in await store.waiting_step_counts():
            if def_hash not in graphs:
                try:
                    graphs[def_hash] = await graph_of(def_hash)
                except BatonError as exc:
                    log.warning("waiting steps of definition %s are not counted: %s", def_hash[:12], exc.message)
                    graphs[def_hash] = None
            graph = graphs[def_hash]
            node = graph.nodes.get(step_id) if graph is not None else None
            if node is not None and (kind := _wait_kind(node)) is not None:
                self.waits[graph.name, kind] += count

    # ------------------------------------------------------- the pump's calls

    def before(self, state: RunState, event: Any, new: bool) -> tuple[str | None, int, bool]:
        """Just before `decide`: what `after` compares with."""
        armed = isinstance(event, TimerFired) and event.timer_id in state.timers
        return (None if new else state.status), _signal_waits(state), armed

    def after(self, before: tuple[str | None, int, bool], state: RunState, event: Any, commands: list) -> Fact:
        """Just after `decide`, while the state is as this decision left it."""
        status, signals, armed = before
        if armed and event.timer_id in state.timers:
            armed = False  # a heartbeat deadline that had moved on: armed again, not passed
        signals = _signal_waits(state) - signals
        return state.workflow, state.run_id, event, commands, status, state.status, signals, armed

    def queued(self, state: RunState) -> Fact:
        """A new run stored to wait for a concurrency slot (decided later)."""
        return state.workflow, state.run_id, None, [], None, QUEUED, 0, False

    def committed(self, facts: Iterable[Fact]) -> None:
        """The batch these facts came from is committed: count them."""
        for workflow, run_id, event, commands, status0, status1, signals, fired in facts:
            if status0 != status1:
                self._moved(workflow, event, status0, status1)
            if signals:
                self.waits[workflow, "signal"] += signals
            ignored = False
            for cmd in commands:
                kind = type(cmd)
                if kind is ExecuteTask:
                    if not cmd.compensation:
                        self._attempts[cmd.task_id] = (event.at, cmd.step_id)
                elif kind is Record:
                    ignored |= self._record(workflow, cmd)
                elif kind is CancelTask:
                    self._attempt_done(workflow, cmd.task_id, event.at, _cancel_outcome(run_id, event, fired, cmd))
                elif kind is StartTimer:
                    if cmd.timer_id.startswith("sleep:"):
                        self.waits[workflow, "sleep"] += 1
                elif kind is CancelTimer:
                    if cmd.timer_id.startswith("sleep:"):
                        self.waits[workflow, "sleep"] -= 1
                elif kind is RunFinished:
                    self.runs_finished(workflow, cmd.status).inc()
            kind = type(event)
            if kind is TaskSucceeded or kind is TaskFailed:
                if not ignored:
                    outcome = "succeeded" if kind is TaskSucceeded else "failed"
                    self._attempt_done(workflow, event.task_id, event.at, outcome)
            elif kind is TimerFired and fired:
                timer = event.timer_id.partition(":")[0]
                if timer == "sleep":
                    self.waits[workflow, "sleep"] -= 1
                elif timer in TIMEOUT_KINDS:
                    self.timeouts(workflow, TIMEOUT_KINDS[timer]).inc()
            elif kind is ApprovalDecided and not ignored:
                self.waits[workflow, "approval"] -= 1

    def _moved(self, workflow: str, event: Any, status0: str | None, status1: str) -> None:
        if status0 in OPEN:
            self.runs_open[workflow, status0] -= 1
        if status1 in OPEN:
            self.runs_open[workflow, status1] += 1
        if isinstance(event, Start) and status0 in (None, QUEUED) and status1 != QUEUED:
            self.runs_started(workflow).inc()
        elif isinstance(event, RetryRequested) and status0 in TERMINAL:
            self.run_retries(workflow).inc()

    def _record(self, workflow: str, cmd: Record) -> bool:
        """Count a history note; True if it says the event was ignored."""
        kind = cmd.type
        if kind == "step.retrying":
            self.step_retries(workflow, _step_of(cmd.key)).inc()
        elif kind == "approval.requested":
            self.waits[workflow, "approval"] += 1
        elif kind == "approval.timed_out" or kind == "approval.cancelled":
            self.waits[workflow, "approval"] -= 1
        return kind == "task.ignored" or kind == "approval.ignored"

    def _attempt_done(self, workflow: str, task_id: str, at: float, outcome: str) -> None:
        started = self._attempts.pop(task_id, None)
        if started is not None:  # else a compensation, or scheduled before this process started
            self.step_seconds(workflow, started[1], outcome).observe(max(0.0, at - started[0]))

    # ------------------------------------------------------ the other feeders

    def dead_lettered(self, rows: Iterable[Any]) -> None:
        """Dead letters just committed (store DeadLetterRow)."""
        for row in rows:
            self.dead_letters(row.workflow or "").inc()

    def schedule_fired(self, rows: Iterable[Any]) -> None:
        """Schedule fire records just committed (store ScheduleFireRow)."""
        for row in rows:
            self.schedule_fires(row.schedule, row.outcome).inc(row.count)

    def store_group(self, batches: int, seconds: float) -> None:
        """The store wrote one group commit."""
        self.commit_seconds.observe(seconds)
        self.commit_batches.observe(batches)

    # ----------------------------------------------------------- scrape time

    async def refresh(self) -> None:
        """Read what lives outside memory (stored timers, the consumer's lag) for the scrape
        that follows. A read that fails or is slow leaves its gauge out of this scrape."""
        self._refreshed = {}
        reads: dict[str, Callable[[], Awaitable[Any]]] = {"timers": self.runtime.store.count_timers}
        triggers = self.runtime.triggers
        if triggers is not None:
            reads["consumer"] = triggers.consumer_lag
        for name, read in reads.items():
            try:
                self._refreshed[name] = await asyncio.wait_for(read(), REFRESH_TIMEOUT_S)
            except Exception as exc:  # a scrape still answers, without this gauge
                log.debug("metrics: %s not read: %r", name, exc)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The body and content type for a scraper's Accept header (text format 0.0.4,
        or OpenMetrics when asked for)."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


def _wait_kind(node: Any) -> str | None:
    if node.kind == "wait_for_signal":
        return "approval" if node.step.wait_for_signal.approval is not None else "signal"
    if node.kind in ("sleep", "wait_until"):
        return "sleep"
    return None


def _cancel_outcome(run_id: str, event: Any, fired: bool, cmd: CancelTask) -> str:
    """Why an attempt was cancelled: its own deadline (`timeout:<key>:<attempt>` names the
    task `<run_id>:<key>:<attempt>`), its worker's silence, or its run stopping."""
    if fired:
        timer, _, rest = event.timer_id.partition(":")
        if cmd.task_id == f"{run_id}:{rest}":
            if timer == "timeout":
                return "timed_out"
            if timer == "heartbeat":
                return "failed"
    return "cancelled"


class _StateCollector(Collector):
    """Gauges of the runtime's state, read at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Any]:
        return iter(())  # no collect() at registration: the runtime may not be running yet

    def collect(self) -> Iterator[Any]:
        m, runtime = self.metrics, self.metrics.runtime
        yield _by_labels("baton_runs_active", "Runs not yet ended, by status (running includes runs waiting "
                         "for a signal, approval or timer; queued: waiting for a concurrency slot)",
                         ["workflow", "status"], m.runs_open)
        yield _by_labels("baton_waiting_steps", "Steps waiting, by kind: signal, approval, sleep "
                         "(sleep and wait_until)", ["workflow", "kind"], m.waits)
        yield GaugeMetricFamily("baton_runtime_inbox_events", "Events waiting for the runtime's pump",
                                value=runtime.inbox_depth())
        executor = runtime.executor
        yield GaugeMetricFamily("baton_tasks_running", "In-process handler attempts running", value=executor.running)
        yield GaugeMetricFamily("baton_tasks_queued", "In-process handler attempts waiting for a slot "
                                "(limits.max_concurrent_tasks, max_concurrent_tasks_per_workflow)",
                                value=len(executor) - executor.running)
        yield GaugeMetricFamily("baton_timers_armed", "Timers due within the in-memory horizon",
                                value=len(runtime.timers))
        if (stored := m._refreshed.get("timers")) is not None:
            yield GaugeMetricFamily("baton_timers_pending", "Timers in the store (every armed timer)", value=stored)
        triggers = runtime.triggers
        if (lag := m._refreshed.get("consumer")) is not None:
            pending, unacked = lag
            yield GaugeMetricFamily("baton_event_consumer_pending", "Trigger events in the stream not yet delivered "
                                    "to Baton (consumer lag)", value=pending)
            yield GaugeMetricFamily("baton_event_consumer_ack_pending", "Trigger events delivered, not yet "
                                    "acknowledged (being handled, or waiting for redelivery)", value=unacked)
        if triggers is not None:
            stats = triggers.stats
            yield CounterMetricFamily("baton_events_received", "Trigger event deliveries handled",
                                      value=stats["received"])
            yield CounterMetricFamily("baton_event_duplicates", "Trigger events already handled before (acknowledged, "
                                      "nothing started)", value=stats["duplicates"])
            yield CounterMetricFamily("baton_event_naks", "Trigger events handed back for a later redelivery "
                                      "(a passing failure, or a workflow at its concurrency limit)",
                                      value=stats["retried"])
        stats = getattr(runtime.store, "stats", None)
        if stats is not None:
            yield CounterMetricFamily("baton_store_transactions", "Store transactions committed",
                                      value=stats.transactions)
            yield CounterMetricFamily("baton_store_failed_batches", "Batches whose commit failed",
                                      value=stats.failed_batches)


def _by_labels(name: str, documentation: str, labels: list[str], counts: Tally) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for key, value in sorted(counts.items()):
        family.add_metric(list(key), value)
    return family
