"""Run and step lifecycle events, as outbox rows written with the transition.

Subjects: `baton.run.<workflow>.<status>` for a run that started or ended, and
`baton.step.<workflow>.<step_id>.<status>` for a step instance that ended
(succeeded, failed, skipped, cancelled). The body is a structured-mode
CloudEvent (type `baton.run.<status>` / `baton.step.<status>`); the headers carry
the run's W3C trace context.

Event ids are derived from what happened, not from when: a run's status per run
attempt, a step's status per run attempt and step attempt. So an event produced
twice (a crash between commit and publish, a replay) has the same id, and the
stream's Nats-Msg-Id dedupe drops the copy.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import orjson

from server.bus.cloudevents import make_event
from server.engine.commands import Command, RunFinished
from server.engine.events import Event, RetryRequested, Start
from server.engine.state import CANCELLED, FAILED, QUEUED, SKIPPED, SUCCEEDED, RunState
from server.store.base import OutboxRow
from server.telemetry.ids import run_span_id, run_trace_id, traceparent

STEP_ENDS = frozenset({SUCCEEDED, FAILED, SKIPPED, CANCELLED})
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")  # a subject token may not hold `.`, `*`, `>` or spaces


def token(name: str) -> str:
    return _UNSAFE.sub("_", name) or "_"


def run_traceparent(run_id: str, event: Any = None, attempt: int = 1) -> str:
    """The W3C trace context (trace-context §3.2) of a run attempt's span: in the run's
    trace (its trigger's, or one derived from its id: server/telemetry/ids.py), so every
    process and every restart agrees on it without storing more."""
    trigger = event.get("traceparent") if isinstance(event, dict) else None
    return _run_traceparent(run_id, trigger if isinstance(trigger, str) else None, max(attempt, 1))


@functools.lru_cache(maxsize=4096)
def _run_traceparent(run_id: str, trigger: str | None, attempt: int) -> str:
    # two hashes per lifecycle row otherwise; a run's rows come in a few consecutive
    # batches, so a small cache answers all but its first
    return traceparent(run_trace_id(run_id, {"traceparent": trigger}), run_span_id(run_id, attempt))


def lifecycle_rows(state: RunState, event: Event, commands: list[Command]) -> list[OutboxRow]:
    """The lifecycle events `event` caused, as outbox rows (none for most heartbeats,
    timers and ignored events: then nothing is encoded)."""
    events: list[tuple[str, str, bytes]] = []  # (subject, id, body)
    wf = token(state.workflow)
    if isinstance(event, (Start, RetryRequested)) and state.status != QUEUED:
        events.append(_run_event(state, "started", event.at, None))
    for key in state.dirty:
        st = state.steps.get(key)
        if st is None or st.status not in STEP_ENDS or st.finished_at != event.at:
            continue  # not a step row, or not ended by this event
        data = {"run_id": state.run_id, "workflow": state.workflow, "version": state.version,
                "workflow_id": state.workflow_id, "key": key, "step_id": st.step_id, "status": st.status,
                "attempt": st.attempt, "output": st.output, "error": st.error}
        id_ = f"{state.run_id}:{key}:{st.status}:{state.attempt}:{st.attempt}"
        body = make_event(f"baton.step.{st.status}", id_, state.run_id, data, event.at)
        events.append((f"baton.step.{wf}.{token(st.step_id)}.{st.status}", id_, body))
    for cmd in commands:
        if isinstance(cmd, RunFinished):
            events.append(_run_event(state, cmd.status, event.at, {"output": cmd.output, "error": cmd.error}))
    if not events:
        return []
    headers = orjson.dumps({"traceparent": run_traceparent(state.run_id, state.event, state.attempt),
                            "Baton-Run-Id": state.run_id})
    return [OutboxRow(None, subject, id_, headers, body) for subject, id_, body in events]


def _run_event(state: RunState, status: str, at: float, extra: dict[str, Any] | None) -> tuple[str, str, bytes]:
    data = {"run_id": state.run_id, "workflow": state.workflow, "version": state.version,
            "workflow_id": state.workflow_id, "status": status, "attempt": state.attempt, **(extra or {})}
    id_ = f"{state.run_id}:{status}:{state.attempt}"
    body = make_event(f"baton.run.{status}", id_, state.run_id, data, at)
    return f"baton.run.{token(state.workflow)}.{status}", id_, body
