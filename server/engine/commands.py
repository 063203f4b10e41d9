"""Commands: what the engine asks the runtime to do, after the transition is committed.

`Record` carries a history fact that is derived rather than observed (a step was
skipped, a retry was scheduled); every other command is an effect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class ExecuteTask:
    task_id: str  # equals the idempotency key: <run_id>:<step key>:<attempt>
    key: str  # step instance key: the step id, prefixed by map iterations (`each[3]/load`)
    step_id: str
    handler: str
    input: Any
    attempt: int
    timeout_s: float | None = None
    queue: str | None = None
    compensation: bool = False
    heartbeat_s: float | None = None  # queue steps: a started attempt whose worker is silent this long fails
    type = "step.scheduled"


@dataclass(frozen=True, slots=True)
class CancelTask:
    task_id: str
    type = "task.cancel"


@dataclass(frozen=True, slots=True)
class StartTimer:
    timer_id: str
    fire_at: float
    type = "timer.started"


@dataclass(frozen=True, slots=True)
class CancelTimer:
    timer_id: str
    type = "timer.cancelled"


@dataclass(frozen=True, slots=True)
class StartChild:
    key: str
    workflow: str
    input: Any
    workflow_id: str | None = None
    type = "child.start"


@dataclass(frozen=True, slots=True)
class CancelChild:
    key: str
    type = "child.cancel"


@dataclass(frozen=True, slots=True)
class Record:
    type: str
    key: str | None = None
    data: Any = None


@dataclass(frozen=True, slots=True)
class RunFinished:
    status: str
    output: Any = None
    error: dict[str, Any] | None = None
    type = "run.finished"


Command = ExecuteTask | CancelTask | StartTimer | CancelTimer | StartChild | CancelChild | Record | RunFinished
