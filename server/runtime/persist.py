"""RunState <-> store rows, and history rows from events and commands."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import orjson

from server.engine.decide import ITEMS_SUFFIX, only_moves_a_heartbeat
from server.engine.commands import (
    CancelChild, CancelTask, Command, ExecuteTask, Record, RunFinished, StartChild, StartTimer,
)
from server.engine.events import Event, event_to_dict
from server.engine.graph import CompiledWorkflow
from server.engine.state import RunState, StepState
from server.store.base import HistoryRow, RunRow, StepRow



def run_row(state: RunState, now: float) -> RunRow:
    return RunRow(
        run_id=state.run_id, workflow=state.workflow, version=state.version, def_hash=state.graph.def_hash,
        workflow_id=state.workflow_id, status=state.status, created_at=state.created_at or now, updated_at=now,
        finished_at=state.finished_at, inflight=len(state.tasks) + len(state.children),
        data=orjson.dumps(state.to_dict()), rev=state.rev,
    )


def step_rows(state: RunState) -> list[StepRow]:
    rows = []
    for key in state.dirty:
        if key.endswith(ITEMS_SUFFIX):
            st = state.steps[key[: -len(ITEMS_SUFFIX)]]
            rows.append(StepRow(state.run_id, key, st.step_id, "items", 0, None, None, orjson.dumps(st.items)))
            continue
        st = state.steps[key]
        rows.append(StepRow(state.run_id, key, st.step_id, st.status, st.attempt, st.started_at, st.finished_at,
                            orjson.dumps(st.to_dict())))
    state.dirty.clear()
    return rows


def load_state(row: RunRow, steps: list[StepRow], graph: CompiledWorkflow) -> RunState:
    items = {r.key[: -len(ITEMS_SUFFIX)]: orjson.loads(r.data) for r in steps if r.key.endswith(ITEMS_SUFFIX)}
    states = {
        r.key: StepState.from_dict(r.key, orjson.loads(r.data), items.get(r.key))
        for r in steps if not r.key.endswith(ITEMS_SUFFIX)
    }
    state = RunState.from_dict(row.run_id, graph, orjson.loads(row.data), states)
    state.rev = row.rev
    return state


def history_rows(state: RunState, at: float, event: Event | None, commands: list[Command]) -> list[HistoryRow]:
    if event is not None and only_moves_a_heartbeat(event, commands):
        return []  # one every few seconds per remote task: history would grow without telling anything
    rows = []
    if event is not None:
        rows.append(_row(state, at, event.type, _event_key(state, event), event_to_dict(event)))
    for cmd in commands:
        entry = _command_entry(cmd)
        if entry is not None:
            rows.append(_row(state, at, *entry))
    return rows


def _event_key(state: RunState, event: Event) -> str | None:
    """The step an event is about."""
    task_id = getattr(event, "task_id", None)
    if task_id is None:
        return getattr(event, "key", None)
    return task_key(state.run_id, task_id)


def task_key(run_id: str, task_id: str) -> str:
    """The step key of an attempt: task ids are `<run_id>:<key>:<attempt>` (or `:compensate:<n>`)."""
    rest = task_id[len(run_id) + 1:].rsplit(":", 1)[0]
    return rest[: -len(":compensate")] if rest.endswith(":compensate") else rest


def _row(state: RunState, at: float, type_: str, key: str | None, data: Any) -> HistoryRow:
    state.seq += 1
    return HistoryRow(state.run_id, state.seq, at, type_, key, orjson.dumps(data))


def _command_entry(cmd: Command) -> tuple[str, str | None, Any] | None:
    if isinstance(cmd, ExecuteTask):
        kind = "compensation.scheduled" if cmd.compensation else "step.scheduled"
        data = {"task_id": cmd.task_id, "handler": cmd.handler, "attempt": cmd.attempt, "input": cmd.input}
        if cmd.queue is not None:
            data["queue"] = cmd.queue
        return kind, cmd.key, data
    if isinstance(cmd, Record):
        return cmd.type, cmd.key, cmd.data
    if isinstance(cmd, RunFinished):
        return f"run.{cmd.status}", None, {"output": cmd.output, "error": cmd.error}
    if isinstance(cmd, StartTimer):
        return "timer.started", None, {"timer_id": cmd.timer_id, "fire_at": cmd.fire_at}
    if isinstance(cmd, CancelTask):
        return "task.cancelled", None, {"task_id": cmd.task_id}
    if isinstance(cmd, (StartChild, CancelChild)):
        return cmd.type, cmd.key, asdict(cmd)
    return None  # CancelTimer: the timer's absence says enough
