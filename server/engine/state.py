"""A run's current state, as the engine keeps it.

Run statuses, and what may follow what:

    queued ──> running ──> succeeded
                  │
                  ├──> compensating ──> compensated | failed | cancelled
                  └──> failed | cancelled            (nothing to compensate)
    failed | compensated | cancelled ──retry──> running

Step statuses:

    pending ──> running ──> succeeded
       │           ├──> retrying ──> running        (a retry delay is pending)
       │           └──> failed | cancelled
       ├──> waiting ──> succeeded | failed | cancelled   (signal, approval, sleep, wait_until)
       └──> skipped                                       (`when` was false)

A succeeded step with a compensator additionally moves through
`compensation`: None ──> running ──> succeeded | failed.

Step instances are keyed: a top-level or parallel step by its id; a step inside a
map iteration by `<map key>[<index>]/<id>` (so nested maps nest the prefix).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.engine.graph import CompiledWorkflow

QUEUED, RUNNING, COMPENSATING = "queued", "running", "compensating"
SUCCEEDED, FAILED, COMPENSATED, CANCELLED = "succeeded", "failed", "compensated", "cancelled"
TERMINAL = frozenset({SUCCEEDED, FAILED, COMPENSATED, CANCELLED})

PENDING, WAITING, RETRYING, SKIPPED = "pending", "waiting", "retrying", "skipped"
STEP_DONE = frozenset({SUCCEEDED, SKIPPED})  # a dependency is satisfied by either


@dataclass(slots=True)
class StepState:
    key: str
    step_id: str
    status: str = PENDING
    attempt: int = 0
    output: Any = None
    error: dict[str, Any] | None = None
    started_at: float | None = None
    finished_at: float | None = None
    epoch: int = 0  # the run attempt in which this instance was last started
    compensation: str | None = None
    comp_attempt: int = 0
    comp_error: dict[str, Any] | None = None
    # map steps only: the evaluated items and iteration counters
    items: list[Any] | None = None
    next_index: int = 0
    active: int = 0
    done: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = {
            "status": self.status, "attempt": self.attempt, "output": self.output, "error": self.error,
            "started_at": self.started_at, "finished_at": self.finished_at, "epoch": self.epoch,
        }
        if self.compensation is not None:
            out.update(compensation=self.compensation, comp_attempt=self.comp_attempt, comp_error=self.comp_error)
        if self.items is not None:
            out.update(next_index=self.next_index, active=self.active, done=self.done)
        return out

    @classmethod
    def from_dict(cls, key: str, data: dict[str, Any], items: list[Any] | None = None) -> StepState:
        st = cls(key, key.rpartition("/")[2])
        for name, value in data.items():
            setattr(st, name, value)
        st.items = items
        return st


@dataclass(slots=True)
class RunState:
    run_id: str
    graph: CompiledWorkflow
    status: str = QUEUED
    workflow_id: str | None = None
    started_by: str | None = None  # who started it (the Start event's `by`), e.g. for approval pages
    input: Any = None
    event: Any = None
    attempt: int = 0  # run attempts: 1 at start, +1 per retry of a failed run
    created_at: float | None = None
    finished_at: float | None = None
    output: Any = None
    error: dict[str, Any] | None = None
    steps: dict[str, StepState] = field(default_factory=dict)
    # succeeded steps that have a compensator, in order of completion
    completed: list[str] = field(default_factory=list)
    # open counters: scope ("" = top level, a parallel key, or `<map key>[i]`) -> steps not yet done
    remaining: dict[str, int] = field(default_factory=dict)
    # in-flight tasks: task_id -> [step key, "step" | "compensate", attempt]
    tasks: dict[str, list[Any]] = field(default_factory=dict)
    timers: dict[str, float] = field(default_factory=dict)
    signals: dict[str, list[str]] = field(default_factory=dict)  # signal name -> waiting step keys
    children: list[str] = field(default_factory=list)  # step keys with a running child workflow
    comp_queue: list[str] = field(default_factory=list)
    comp_outcome: str = COMPENSATED  # the status to end in when compensation goes well
    comp_failed: bool = False
    # bookkeeping for the runtime, not part of the run's meaning: the engine ignores them
    parent: list[str] | None = None  # [parent run id, step key] for a child workflow run
    seq: int = 0  # last history sequence number written
    rev: int = 0  # the stored row's revision this state was read at (the store's fence); not in to_dict
    slot: str | None = None  # concurrency key, for workflows with a `concurrency` limit
    queued_start: dict[str, Any] | None = None  # the Start event of a run waiting for a slot
    dirty: set[str] = field(default_factory=set)

    @property
    def workflow(self) -> str:
        return self.graph.name

    @property
    def version(self) -> str:
        return self.graph.version

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def waiting_for(self, signal: str) -> bool:
        return bool(self.signals.get(signal))

    def to_dict(self) -> dict[str, Any]:
        """Run-level fields (steps are persisted as rows of their own)."""
        return {
            "status": self.status, "workflow_id": self.workflow_id, "started_by": self.started_by,
            "input": self.input, "event": self.event,
            "attempt": self.attempt, "created_at": self.created_at, "finished_at": self.finished_at,
            "output": self.output, "error": self.error, "completed": self.completed,
            "remaining": self.remaining, "tasks": self.tasks, "timers": self.timers, "signals": self.signals,
            "children": self.children, "comp_queue": self.comp_queue, "comp_outcome": self.comp_outcome,
            "comp_failed": self.comp_failed, "parent": self.parent, "seq": self.seq,
            "slot": self.slot, "queued_start": self.queued_start,
        }

    @classmethod
    def from_dict(cls, run_id: str, graph: CompiledWorkflow, data: dict[str, Any], steps: dict[str, StepState]) -> RunState:
        st = cls(run_id, graph, steps=steps)
        for name, value in data.items():
            setattr(st, name, value)
        return st

    def view(self) -> dict[str, Any]:
        """A comparable snapshot of everything that carries meaning (tests compare these)."""
        return {**self.to_dict(), "seq": None, "steps": {k: s.to_dict() | {"items": s.items} for k, s in self.steps.items()}}
