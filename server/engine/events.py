"""Events: what happened to a run. They are the engine's only input.

Every event carries `at` (unix seconds) because the engine never reads a clock, and
events that may lead to a retry carry `jitter` (a number in [0, 1) drawn by the
runtime) because the engine never draws random numbers. Events are stored in the
run's history verbatim; folding `decide` over them rebuilds the run's state.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    type: str
    message: str
    retryable: bool = True
    details: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "message": self.message, "retryable": self.retryable}
        if self.details:
            out["details"] = self.details
        return out


@dataclass(frozen=True, slots=True)
class Start:
    at: float
    input: Any = None
    event: Any = None  # the trigger (CloudEvent, webhook body, API request metadata)
    workflow_id: str | None = None
    by: str | None = None
    type = "run.started"


@dataclass(frozen=True, slots=True)
class TaskSucceeded:
    task_id: str
    at: float
    output: Any = None
    type = "task.succeeded"


@dataclass(frozen=True, slots=True)
class TaskFailed:
    task_id: str
    at: float
    error: ErrorInfo = field(default_factory=lambda: ErrorInfo("Error", "failed"))
    jitter: float = 0.5
    type = "task.failed"


@dataclass(frozen=True, slots=True)
class TaskStarted:
    """A remote worker took the attempt and began its handler (`worker` names it, for
    history). From now on the worker must send heartbeats: this arms the deadline."""

    task_id: str
    at: float
    worker: str | None = None
    type = "task.started"


@dataclass(frozen=True, slots=True)
class TaskHeartbeat:
    """A remote attempt is alive: its heartbeat deadline moves to `at` + the step's
    heartbeat. Heartbeats are not history (there is one every few seconds per task);
    the runtime also sends one for each started attempt after a restart, so that its
    worker gets one full interval to report in."""

    task_id: str
    at: float
    type = "task.heartbeat"


@dataclass(frozen=True, slots=True)
class TimerFired:
    timer_id: str
    at: float
    jitter: float = 0.5
    type = "timer.fired"


@dataclass(frozen=True, slots=True)
class SignalReceived:
    name: str
    at: float
    payload: Any = None
    by: str | None = None
    type = "signal.received"


@dataclass(frozen=True, slots=True)
class ApprovalDecided:
    """A person decided the approval request `attempt` of step `key`. `by` says who, as
    far as Baton knows: {"name", "via"}, via "token" (an API token: authenticated),
    "link" (whoever held the link; `name` is what they typed, not verified) or "api"
    (API authentication was off)."""

    key: str
    attempt: int
    decision: str  # approve | reject
    at: float
    by: dict[str, Any] | None = None
    comment: str | None = None
    type = "approval.decided"


@dataclass(frozen=True, slots=True)
class CancelRequested:
    at: float
    reason: str = "cancelled"
    by: str | None = None
    type = "run.cancel_requested"


@dataclass(frozen=True, slots=True)
class RetryRequested:
    at: float
    by: str | None = None
    type = "run.retry_requested"


@dataclass(frozen=True, slots=True)
class ChildFinished:
    key: str
    at: float
    status: str
    output: Any = None
    error: ErrorInfo | None = None
    type = "child.finished"


Event = (Start | TaskSucceeded | TaskFailed | TaskStarted | TaskHeartbeat | TimerFired | SignalReceived
         | ApprovalDecided | CancelRequested | RetryRequested | ChildFinished)
EVENT_TYPES: dict[str, type] = {
    cls.type: cls
    for cls in (Start, TaskSucceeded, TaskFailed, TaskStarted, TaskHeartbeat, TimerFired, SignalReceived,
                ApprovalDecided, CancelRequested, RetryRequested, ChildFinished)
}


_FIELDS: dict[type, tuple[str, ...]] = {cls: tuple(f.name for f in fields(cls)) for cls in EVENT_TYPES.values()}


def event_to_dict(event: Event) -> dict[str, Any]:
    """The event as history stores it. Shallow, unlike `dataclasses.asdict`, which deep-copies
    every input and output on the hot path only for the copy to be serialised and dropped:
    the values are shared with the event, so the caller must not mutate them."""
    out = {name: getattr(event, name) for name in _FIELDS[type(event)]}
    error = out.get("error")
    if isinstance(error, ErrorInfo):
        out["error"] = {"type": error.type, "message": error.message, "retryable": error.retryable,
                        "details": error.details}
    return out


def event_from_dict(type_: str, data: dict[str, Any]) -> Event:
    cls = EVENT_TYPES[type_]
    if "error" in data and isinstance(data["error"], dict):
        data = {**data, "error": ErrorInfo(**data["error"])}
    return cls(**data)
