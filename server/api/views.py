"""What the API answers: pydantic models of the JSON the routes return.

These models document the responses (the OpenAPI document is generated from them)
and the tests check real responses against them; the runtime still builds plain
dicts (server/runtime/runner.py `_summary*`, `_detail`, `_workflow_view`, ...), so
a field added there must be added here, or the schema tests fail.

Rules: every key the runtime always writes is required, nullable where it can be
null; timestamps are RFC 3339 strings in UTC; values that come from workflows or
callers (inputs, outputs, signal data, event payloads) are free-form JSON (`Any`).
Extra keys are allowed by the schemas, so a client keeps working when one is added.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, WithJsonSchema

from server.definitions.models import STEP_KINDS, Workflow

Timestamp = Annotated[str, WithJsonSchema({"type": "string", "format": "date-time"})]
RunStatus = Literal["queued", "running", "compensating", "succeeded", "failed", "compensated", "cancelled"]
StepStatus = Literal["pending", "running", "retrying", "waiting", "succeeded", "failed", "cancelled", "skipped"]
StepKind = Literal[STEP_KINDS]  # type: ignore[valid-type]


class _View(BaseModel):
    pass


# --- errors -----------------------------------------------------------------------


class ErrorDetail(_View):
    code: str = Field(description="Stable, machine-readable: `run_not_found`, `invalid_input`, ...")
    message: str = Field(description="For people: what was wrong and, where it helps, what would work")
    # absent (never null) when no single part of the request is at fault
    field: str = Field(None, description="The request part at fault (`input.name`, `limit`), when one is",
                       json_schema_extra=lambda schema: schema.pop("default"))


class Error(_View):
    """Every error response of the API, whatever its status."""

    error: ErrorDetail


# --- runs -------------------------------------------------------------------------


class Failure(_View):
    """Why a step (or a compensation) failed."""

    type: str = Field(description="The error's kind: an exception name, `Timeout`, `Cancelled`, ...")
    message: str
    retryable: bool
    details: dict[str, Any] = Field(default_factory=dict, description="Present only when the handler gave some")


class RunFailure(Failure):
    step: str | None = Field(description="The step whose failure ended the run (null for a cancel or a run timeout)")


class Compensation(_View):
    status: Literal["running", "succeeded", "failed"]
    attempt: int
    error: Failure | None


class StepView(_View):
    key: str = Field(description="The step instance: its id, or `<map key>[<index>]/<id>` inside a map")
    step_id: str
    kind: StepKind
    status: StepStatus
    attempt: int
    output: Any
    error: Failure | None
    started_at: Timestamp | None
    finished_at: Timestamp | None
    duration_s: float | None
    compensation: Compensation | None


class RunSummary(_View):
    run_id: str
    workflow: str
    version: str
    workflow_id: str | None = Field(description="The starter's business key, if it gave one")
    status: RunStatus
    attempt: int = Field(description="Run attempts: 1 at start, +1 per retry")
    created_at: Timestamp
    updated_at: Timestamp
    finished_at: Timestamp | None


class RunDetail(RunSummary):
    input: Any
    output: Any
    error: RunFailure | None
    waiting_for: list[str] = Field(description="Signals a step of the run waits for now")
    steps: list[StepView] = Field(description="In start order")
    trace_id: str = Field(pattern=r"^[0-9a-f]{32}$",
                          description="The W3C trace id of the run's spans: its trigger's trace, else derived from the run id")


class RunPage(_View):
    runs: list[RunSummary]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page")


class HistoryEvent(_View):
    seq: int = Field(description="Increasing within the run; pass the last one as `after` for the next page")
    at: Timestamp
    type: str = Field(description="`run.started`, `step.succeeded`, `signal.received`, ...")
    key: str | None = Field(description="The step instance the event is about, if any")
    data: Any


class HistoryPage(_View):
    events: list[HistoryEvent]
    next_after: int | None = Field(
        description="Pass as `after` for the next page; null when this page reached the end of the history so far"
    )


class SignalDelivered(_View):
    run_id: str
    signal: str
    delivered: Literal[True]


class SpanEvent(_View):
    name: str = Field(description="`retry scheduled`, `timeout`, `signal received`, `approval decided`, `exception`, ...")
    at: Timestamp
    attributes: dict[str, Any]


class Span(_View):
    """One span of a run, as Baton exports it over OTLP (server/telemetry/trace.py)."""

    span_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    parent_id: str | None = Field(description="Null for a run span no trigger's trace context came with")
    name: str = Field(description="`run <workflow>`, `step <id>`, `compensate <id>`, `signal <name>`, `sleep <id>`, `approval <id>`")
    kind: Literal["internal", "producer"] = Field(description="`producer` for a step sent to a remote queue")
    start: Timestamp
    end: Timestamp | None = Field(description="Null while the span is open (the run is still at it)")
    duration_s: float | None
    status: Literal["ok", "error", "unset"]
    message: str | None = Field(description="The error, for status `error`")
    attributes: dict[str, Any] = Field(description="`baton.run.id`, `baton.step.attempt`, `baton.outcome`, ...")
    events: list[SpanEvent]


class RunTraceView(_View):
    run_id: str
    trace_id: str = Field(pattern=r"^[0-9a-f]{32}$")
    spans: list[Span] = Field(description="By start time; the tree is in `parent_id`")


# --- workflows --------------------------------------------------------------------


class WorkflowView(_View):
    name: str
    version: str = Field(description="The latest loaded version")
    def_hash: str = Field(description="Hash of the definition: runs pin it")
    description: str
    steps: list[str] = Field(description="Top-level step ids, in order")
    input_schema: dict[str, Any] | None = Field(description="JSON Schema the run input must match, if any")
    versions: list[str] = Field(description="Every loaded version, oldest first")


class WorkflowList(_View):
    workflows: list[WorkflowView]


class WorkflowVersion(_View):
    version: str
    def_hash: str
    latest: bool = Field(description="New runs that name no version start this one")
    description: str


class WorkflowVersions(_View):
    name: str
    versions: list[WorkflowVersion] = Field(description="Oldest first")


class WorkflowDefinition(WorkflowVersion):
    name: str
    definition: Workflow = Field(description="The definition as loaded (null fields left out)")


# --- dead letters -----------------------------------------------------------------


class DeadLetter(_View):
    id: int
    at: Timestamp
    subject: str = Field(description="The NATS subject the event arrived on")
    event_key: str | None = Field(description="The event's dedupe key (CloudEvents id or message id)")
    workflow: str | None = Field(description="The workflow it was meant to start, when known")
    error: str
    headers: dict[str, Any]
    data: Any = Field(description="The event body: JSON when it parses, else text")
    replayed_at: Timestamp | None
    replay_run: str | None


class DeadLetterPage(_View):
    dead_letters: list[DeadLetter]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page")


class ReplayedRun(_View):
    workflow: str
    run_id: str
    created: bool = Field(description="False when the event had already started this run")


class Replayed(_View):
    id: int
    runs: list[ReplayedRun]


# --- probes -----------------------------------------------------------------------


class Health(_View):
    status: Literal["ok"]


class Ready(_View):
    status: Literal["ready"]
    runtime: str
    store: str
    nats: str = Field(description="`connected`, `disabled`, ...")
