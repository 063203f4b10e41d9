"""Exports for audits and chargeback: one row per run, or one row per step attempt.

Rows are plain dicts with the keys of RUN_COLUMNS / STEP_COLUMNS (the API writes them
as CSV or JSON Lines). They come page by page: runs by keyset (oldest first), and each
page's steps and history in bounded queries, so an export of a year of runs holds about
one page in memory, however big the database.

Step attempts come from history, because the steps table keeps only a step's latest
state while history has every attempt. The rows of one attempt, by its task id
(`<run_id>:<key>:<n>`, or `<run_id>:<key>:compensate:<n>` for a compensation):

    step.scheduled | compensation.scheduled   it began (dispatched to a handler)
    task.started                              a worker took it (queue steps): it began here
    task.succeeded | task.failed              it ended
    task.cancelled                            it was stopped: by a cancel or the run's timeout
                                              (cancelled), or by the step's timeout or a lost
                                              heartbeat, which a step.retrying / step.failed of
                                              the same moment reports (failed, with that error)

Steps that run no handler (waits, sleeps, parallel, map, sub-workflows), skipped steps
and steps that failed before dispatch (an input template error) have no attempt in
history: each gets one row from the steps table, its attempt as stored (0 when it runs
no handler), as the run view shows it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from server.engine.decide import ITEMS_SUFFIX
from server.engine.graph import CompiledWorkflow
from server.errors import BatonError
from server.runtime.clock import iso
from server.store.base import TERMINAL, HistoryRow, RunRow, StepRow, Store

RUN_COLUMNS = (
    "run_id", "workflow", "version", "workflow_id", "status", "attempt", "created_at", "finished_at",
    "duration_s", "started_by", "error",
)
# The columns, with the run view's names for times (`started_at`, `duration_s`:
# names carry units), plus `kind` (task, compensation, wait_for_signal, map, ...).
STEP_COLUMNS = (
    "workflow", "version", "workflow_id", "run_id", "step", "kind", "task_id", "attempt", "status",
    "started_at", "finished_at", "duration_s", "error",
)
# Runs per page; a page's history is read in pages of HISTORY_PAGE rows.
DEFAULT_PAGE_SIZE = 500
HISTORY_PAGE = 5000
_ATTEMPT_TYPES = (
    "step.scheduled", "compensation.scheduled", "task.started", "task.succeeded", "task.failed", "task.cancelled",
    "step.retrying", "step.failed", "compensation.retrying", "compensation.failed",
)
COMPENSATION = "compensation"

GraphOf = Callable[[str], Awaitable[CompiledWorkflow]]


# --- runs -------------------------------------------------------------------------


async def export_runs(store: Store, *, workflow: str | None = None, status: str | None = None,
                      since: float | None = None, until: float | None = None,
                      page_size: int = DEFAULT_PAGE_SIZE) -> AsyncIterator[list[dict[str, Any]]]:
    """Pages of run rows, oldest first, for runs created in [since, until)."""
    async for page in store.iter_runs(workflow=workflow, status=status, since=since, until=until,
                                      page_size=page_size):
        data = [orjson.loads(r.data) for r in page]
        # runs store who started them; older ones only say it in their run.started entry
        unknown = [r.run_id for r, d in zip(page, data) if "started_by" not in d]
        starts = await store.first_history(unknown, "run.started") if unknown else {}
        rows = []
        for run, d in zip(page, data):
            by = d["started_by"] if "started_by" in d else _started_by(starts.get(run.run_id), d)
            rows.append(_run_row(run, d, by))
        yield rows


def _started_by(start: HistoryRow | None, data: dict[str, Any]) -> str | None:
    if start is not None:
        return orjson.loads(start.data).get("by")
    return (data.get("queued_start") or {}).get("by")  # queued: its start is kept aside


def _run_row(run: RunRow, data: dict[str, Any], started_by: str | None) -> dict[str, Any]:
    return {
        "run_id": run.run_id, "workflow": run.workflow, "version": run.version, "workflow_id": run.workflow_id,
        "status": run.status, "attempt": data.get("attempt", 0), "created_at": iso(run.created_at),
        "finished_at": iso(run.finished_at), "duration_s": _duration(run.created_at, run.finished_at),
        "started_by": started_by, "error": error_text(data.get("error")),
    }


# --- step attempts ----------------------------------------------------------------


async def export_steps(store: Store, graph_of: GraphOf, *, workflow: str | None = None, status: str | None = None,
                       since: float | None = None, until: float | None = None,
                       page_size: int = DEFAULT_PAGE_SIZE) -> AsyncIterator[list[dict[str, Any]]]:
    """Pages of step attempt rows of the runs created in [since, until), oldest run first;
    within a run, steps in the order they started, each step's attempts in order, then
    the compensations in the order they ran."""
    kinds: dict[str, dict[str, str]] = {}
    async for page in store.iter_runs(workflow=workflow, status=status, since=since, until=until,
                                      page_size=page_size):
        ids = [r.run_id for r in page]
        steps: dict[str, list[StepRow]] = {run_id: [] for run_id in ids}
        for step in await store.steps_of(ids):
            steps[step.run_id].append(step)
        folds = {run_id: _Attempts() for run_id in ids}
        async for history in store.iter_history(ids, types=_ATTEMPT_TYPES, page_size=HISTORY_PAGE):
            for h in history:
                folds[h.run_id].add(h)
        rows: list[dict[str, Any]] = []
        for run in page:
            if run.def_hash not in kinds:
                kinds[run.def_hash] = await _kinds(graph_of, run.def_hash)
            rows += folds[run.run_id].rows(run, steps[run.run_id], kinds[run.def_hash])
        yield rows


async def _kinds(graph_of: GraphOf, def_hash: str) -> dict[str, str]:
    """Step id -> kind; empty when the definition is gone (the rows then leave kind blank)."""
    try:
        graph = await graph_of(def_hash)
    except BatonError:
        return {}
    return {step_id: node.kind for step_id, node in graph.nodes.items()}


@dataclass(slots=True)
class _Attempt:
    key: str
    kind: str  # "task" or COMPENSATION
    task_id: str
    attempt: int
    started: float
    status: str = "running"
    finished: float | None = None
    error: str | None = None


class _Attempts:
    """Folds one run's history (the _ATTEMPT_TYPES rows, by seq) into its attempts."""

    def __init__(self) -> None:
        self.by_task: dict[str, _Attempt] = {}  # in the order they were scheduled
        self.latest: dict[tuple[str, str], _Attempt] = {}  # (key, kind) -> its latest attempt

    def add(self, h: HistoryRow) -> None:
        data = orjson.loads(h.data)
        if h.type in ("step.scheduled", "compensation.scheduled"):
            kind = COMPENSATION if h.type == "compensation.scheduled" else "task"
            if data["task_id"] not in self.by_task:  # never twice; keep the first if it were
                a = _Attempt(h.key or "", kind, data["task_id"], data["attempt"], h.at)
                self.by_task[a.task_id] = self.latest[a.key, kind] = a
            return
        if h.type.startswith("task."):
            a = self.by_task.get(data.get("task_id"))
            if a is None or a.finished is not None:
                return  # a late outcome of an attempt already stopped: the engine ignored it too
            if h.type == "task.started":
                a.started = h.at
            elif h.type == "task.succeeded":
                a.status, a.finished = "succeeded", h.at
            elif h.type == "task.failed":
                a.status, a.finished, a.error = "failed", h.at, error_text(data.get("error"))
            else:  # task.cancelled
                a.status, a.finished = "cancelled", h.at
            return
        # step.retrying | step.failed | compensation.retrying | compensation.failed: after a
        # task.cancelled of the same moment, they say the attempt was stopped for failing
        kind = COMPENSATION if h.type.startswith(COMPENSATION) else "task"
        a = self.latest.get((h.key or "", kind))
        if a is not None and a.status == "cancelled" and a.finished == h.at:
            a.status = "failed"
            a.error = error_text(data.get("error") if h.type.endswith(".retrying") else data)

    def rows(self, run: RunRow, steps: list[StepRow], kinds: dict[str, str]) -> list[dict[str, Any]]:
        attempts: dict[str, list[_Attempt]] = {}
        compensations: list[_Attempt] = []
        for a in self.by_task.values():
            (compensations if a.kind == COMPENSATION else attempts.setdefault(a.key, [])).append(a)
        base = {"workflow": run.workflow, "version": run.version, "workflow_id": run.workflow_id,
                "run_id": run.run_id}
        rows = []
        for step in steps:
            if step.key.endswith(ITEMS_SUFFIX):
                continue  # a map's item list, stored beside the map step
            if step.key in attempts:
                for a in sorted(attempts.pop(step.key), key=lambda a: a.attempt):
                    rows.append(_attempt_row(base, a, kinds.get(step.step_id), step))
            elif step.status != "pending":  # pending: reset for a run retry and not reached again
                rows.append(_step_row(base, step, kinds.get(step.step_id)))
        for key, rest in attempts.items():  # a step row no longer stored: its history still tells
            rows += [_attempt_row(base, a, kinds.get(key.rpartition("/")[2]), None) for a in rest]
        rows += [_attempt_row(base, a, COMPENSATION, None) for a in compensations]
        return rows


def _attempt_row(base: dict[str, Any], a: _Attempt, kind: str | None, step: StepRow | None) -> dict[str, Any]:
    status, finished = a.status, a.finished
    if finished is None and step is not None and step.attempt == a.attempt and step.status in _ENDED:
        status, finished = step.status, step.finished_at  # ended without a history row of its own
    return {**base, "step": a.key, "kind": kind, "task_id": a.task_id, "attempt": a.attempt, "status": status,
            "started_at": iso(a.started), "finished_at": iso(finished), "duration_s": _duration(a.started, finished),
            "error": a.error}


def _step_row(base: dict[str, Any], step: StepRow, kind: str | None) -> dict[str, Any]:
    error = orjson.loads(step.data).get("error")
    return {**base, "step": step.key, "kind": kind, "task_id": None, "attempt": step.attempt, "status": step.status,
            "started_at": iso(step.started_at), "finished_at": iso(step.finished_at),
            "duration_s": _duration(step.started_at, step.finished_at), "error": error_text(error)}


_ENDED = (*TERMINAL, "skipped")


def _duration(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round(end - start, 3)


def error_text(error: Any) -> str | None:
    """`Type: message`, one line for a spreadsheet cell."""
    if not error:
        return None
    if isinstance(error, dict):
        kind, message = error.get("type"), error.get("message", "")
        return f"{kind}: {message}" if kind else str(message)
    return str(error)
