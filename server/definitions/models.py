"""The workflow language: pydantic models of a workflow definition.

A workflow file looks like this (see config/workflows/ for complete examples)::

    name: order-saga
    version: 3
    input_schema: {type: object, required: [order_id], properties: {...}}
    timeout: 1h
    defaults: {retry: {max_attempts: 3}}
    steps:
      - id: reserve
        task: inventory.reserve            # a handler name
        input: {sku: "{{ input.sku }}"}    # a template
        compensate: {task: inventory.release, input: {sku: "{{ input.sku }}"}}
      - id: approve
        wait_for_signal: {signal: approve, timeout: 4h}
      - id: ship
        task: shipping.ship
    triggers:                              # optional: what starts runs besides the API
      - event: {subject: orders.created, filter: "event.data.total > 0"}
      - webhook: {path: new-order, secret: {env: SHOP_HOOK_SECRET}, signature: hmac-sha256}
      - cron: {schedule: "0 7 * * MON-FRI", timezone: Europe/Berlin, exclude: [month-end-close]}
      - every: {interval: 15m}

Rules the models enforce (the loader adds the cross-step ones: unique ids, known
`needs`, no cycles, known handlers, templates that compile):

* A step has exactly one kind: `task`, `wait_for_signal`, `sleep`, `wait_until`,
  `parallel`, `map` or `workflow`.
* `needs` absent means "the previous step in the same list" (none for the first);
  `needs: []` means no dependency at all.
* Durations are `30s`, `5m`, `1h30m`, `1d`, `250ms` or plain seconds.
* `queue: <name>` runs a task's handler (and its compensation) on a remote
  `baton worker --queue <name>`; the server need not know those handlers.
  `heartbeat` (queue steps only) is how long the worker may stay silent.
* Unknown fields are errors, never silently dropped.
"""

from __future__ import annotations

import math
import re
from datetime import date, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, model_validator

from server.definitions.cron import CronText, DayOrInstant, TimeZoneName

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION_UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float:
    """Seconds from `30s`, `5m`, `1h30m`, `250ms`, `1d` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration must be a number of seconds or a string like 30s, 5m, 1h30m")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().replace(" ", "")
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION_PART.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise ValueError(
                    f"invalid duration {value!r}: use e.g. 30s, 5m, 1h30m, 250ms or plain seconds"
                ) from None
            seconds = sum(float(n) * _DURATION_UNITS_S[u] for n, u in parts)
    else:
        raise ValueError("a duration must be a number of seconds or a string like 30s, 5m, 1h30m")
    if not math.isfinite(seconds):  # nan/inf would never fire (or always fire) as a timer
        raise ValueError(f"invalid duration {value!r}: must be a finite number")
    if seconds < 0:
        raise ValueError(f"invalid duration {value!r}: must not be negative")
    return seconds


# The JSON Schema (for editors) must describe what a file may say, not the parsed float.
_DURATION_JSON_SCHEMA = {
    "type": ["number", "string"],
    "minimum": 0,
    "description": "seconds, or a string like 30s, 5m, 1h30m, 250ms, 1d",
}
Duration = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema(_DURATION_JSON_SCHEMA)]
StepId = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")]
# A template is any JSON-like value; strings in it may contain `{{ expression }}`.
# A string that is exactly one `{{ expression }}` yields the expression's native value.
Template = Any
# An expression is Jinja2 expression syntax without the braces: `input.amount > 100`.
Expression = str


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetryPolicy(_Model):
    """Exponential backoff: delay(n) = min(initial_delay * multiplier**(n-1), max_delay),
    then spread by +/- jitter (a fraction of the delay) using a random value that the
    runtime supplies with the failure event."""

    max_attempts: int = Field(3, ge=1, le=1000)
    initial_delay: Duration = 1.0
    multiplier: float = Field(2.0, ge=1.0, le=100.0)
    max_delay: Duration = 300.0
    jitter: float = Field(0.1, ge=0.0, le=1.0)
    non_retryable: list[str] = Field(default_factory=list)


NO_RETRY = RetryPolicy(max_attempts=1)


class Compensation(_Model):
    task: str
    input: Template = None
    retry: RetryPolicy | None = None
    timeout: Duration | None = None


# Who may decide an approval through the API: a token name or a role name.
ApproverName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")]


class Approval(_Model):
    """A person decides: entering the step sends a signed, expiring, single-use link
    (server/runtime/approvals.py). A plain signal never decides an approval."""

    # a template (sees input, steps, run); default: "Approve step <id> of <workflow>?"
    message: str | None = None
    # token or role names that may decide through the API; empty: any approver. The
    # link itself is a credential: whoever holds it may decide (history says so).
    approvers: list[ApproverName] = Field(default_factory=list)
    timeout: Annotated[Duration, Field(gt=0)] | None = None
    # what the timeout decides: reject/approve as if a person had ("timeout" decided),
    # fail: the step fails with ApprovalTimeout (the run fails and compensates)
    on_timeout: Literal["reject", "approve", "fail"] = "reject"
    # fail: a rejection fails the step (ApprovalRejected; the run fails and compensates);
    # continue: the step succeeds with output {"decision": "reject", ...}, for `when`s below
    on_reject: Literal["fail", "continue"] = "fail"


class SignalWait(_Model):
    # default: the step's id
    signal: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] | None = None
    timeout: Duration | None = None
    # fail: the step fails (retry policy does not apply; the run fails and compensates);
    # continue: the step succeeds with output null, so the run goes on.
    on_timeout: Literal["fail", "continue"] = "fail"
    approval: Approval | None = None

    @model_validator(mode="after")
    def _approval_has_its_own_timeout(self) -> SignalWait:
        if self.approval is not None:
            mixed = sorted({"signal", "timeout", "on_timeout"} & self.model_fields_set)
            if mixed:
                raise ValueError(f"{', '.join(mixed)} belong(s) to plain signal waits: an approval is decided "
                                 "through its link or `baton approve`, and takes approval.timeout / approval.on_timeout")
        return self


class MapSpec(_Model):
    items: Expression
    max_concurrency: int = Field(10, ge=1, le=10_000)
    # The steps run once per item, as their own small pipeline; they see `item` and
    # `index`. The map's output is the list of each iteration's last step output.
    steps: list[Step] = Field(min_length=1)


class ChildWorkflow(_Model):
    name: str
    input: Template = None
    workflow_id: Template = None


STEP_KINDS = ("task", "wait_for_signal", "sleep", "wait_until", "parallel", "map", "workflow")

# A queue name is one NATS subject token (`baton.tasks.<queue>`) and part of a consumer name.
QueueName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
# A remote worker that sends no heartbeat for this long is taken for dead: its attempt
# fails (retryable). Workers send one every third of it, so two lost in a row are
# tolerated, and a crashed worker is noticed within half a minute.
DEFAULT_HEARTBEAT_S = 30.0


class Step(_Model):
    id: StepId
    # --- the kind: exactly one of these ---
    task: str | None = None
    wait_for_signal: SignalWait | None = None
    sleep: Duration | None = None
    wait_until: Template = None
    parallel: dict[StepId, list[Step]] | None = None
    map: MapSpec | None = None
    workflow: ChildWorkflow | None = None
    # --- task options ---
    input: Template = None
    queue: QueueName | None = None  # run the handler on a remote worker of this queue
    heartbeat: Annotated[Duration, Field(gt=0)] | None = None  # queue steps only; default DEFAULT_HEARTBEAT_S
    # --- common ---
    description: str = ""
    needs: list[StepId] | None = None
    when: Expression | None = None
    retry: RetryPolicy | None = None
    timeout: Duration | None = None
    compensate: Compensation | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Step:
        kinds = [k for k in STEP_KINDS if getattr(self, k) is not None]
        if len(kinds) != 1:
            found = ", ".join(kinds) if kinds else "none"
            raise ValueError(f"a step must have exactly one of {', '.join(STEP_KINDS)} (found: {found})")
        if self.parallel is not None and not self.parallel:
            raise ValueError("parallel needs at least one branch")
        if self.parallel is not None and any(not b for b in self.parallel.values()):
            raise ValueError("every parallel branch needs at least one step")
        if self.kind != "task" and (self.input is not None or self.queue is not None):
            raise ValueError("input and queue belong to task steps")
        if self.heartbeat is not None and self.queue is None:
            raise ValueError("heartbeat belongs to steps with a queue (remote workers send heartbeats)")
        if self.wait_for_signal is not None and self.wait_for_signal.approval is not None and self.timeout is not None:
            raise ValueError("an approval step takes wait_for_signal.approval.timeout, not the step's timeout")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in STEP_KINDS if getattr(self, k) is not None)


class Concurrency(_Model):
    limit: int = Field(ge=1)
    # Optional template: runs with the same rendered key share the limit.
    key: Template = None


class StepDefaults(_Model):
    retry: RetryPolicy | None = None
    timeout: Duration | None = None


_SUBJECT_TOKEN = re.compile(r"^[^\s.*>]+$")


def check_subject(subject: str) -> str:
    """A NATS subject for an event trigger: dot-separated tokens, `*` for one token,
    `>` for the rest (last token only). Subjects under `baton.` are Baton's own, and a
    leading wildcard would capture them, so both are refused."""
    tokens = subject.split(".")
    for i, token in enumerate(tokens):
        if token == ">" and i == len(tokens) - 1 and i > 0:
            continue
        if token == "*" and i > 0:
            continue
        if not _SUBJECT_TOKEN.match(token):
            if i == 0 and token in ("*", ">"):
                raise ValueError(f"subject {subject!r} must start with a literal token (a leading wildcard would also capture Baton's own baton.* subjects)")
            raise ValueError(f"invalid subject {subject!r}: token {i + 1} ({token!r}) must be a name, `*`, or a final `>`, without spaces")
    if tokens[0] == "baton" or tokens[0].startswith("$"):
        raise ValueError(f"subject {subject!r} is reserved ({tokens[0]}.* belongs to Baton or to NATS itself)")
    return subject


Subject = Annotated[str, BeforeValidator(lambda v: check_subject(v) if isinstance(v, str) else v)]


class EventTrigger(_Model):
    """Start a run for each event published on `subject` (NATS wildcards allowed).

    The templates see `event` (the CloudEvent: id, source, type, subject, time, data,
    and any extensions). `input` defaults to the event's data."""

    subject: Subject
    filter: Expression | None = None
    input: Template = None
    workflow_id: Template = None


class SecretRef(_Model):
    """A secret by name: `{env: NAME}` is read from the environment when Baton starts.
    The secret itself never appears in a workflow file (nor in history or logs)."""

    env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]


def _secret_by_name(value: Any) -> Any:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        raise ValueError("a secret is never written in a workflow file: name an environment variable, "
                         "e.g. `secret: {env: GITHUB_WEBHOOK_SECRET}`")
    return value


# A webhook's path is one URL segment: POST /hooks/<path>.
HookPath = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
# Five minutes either way: Stripe's default, room for clock skew and a retry or two.
DEFAULT_WEBHOOK_TOLERANCE_S = 300.0


class WebhookTrigger(_Model):
    """Start a run for each signed `POST /hooks/<path>` (server/triggers/webhooks.py).

    `signature: github` checks GitHub's `X-Hub-Signature-256`; `hmac-sha256` checks
    `X-Baton-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">` and
    refuses a `t` more than `tolerance` away from now. The templates see `event`
    (type "webhook", hook, delivery, data = the JSON body, headers); `input`
    defaults to the body."""

    path: HookPath
    secret: Annotated[SecretRef, BeforeValidator(_secret_by_name)]
    signature: Literal["github", "hmac-sha256"]
    filter: Expression | None = None
    input: Template = None
    workflow_id: Template = None
    tolerance: Annotated[Duration, Field(gt=0)] = DEFAULT_WEBHOOK_TOLERANCE_S

    @model_validator(mode="after")
    def _tolerance_needs_a_timestamp(self) -> WebhookTrigger:
        if self.signature == "github" and "tolerance" in self.model_fields_set:
            raise ValueError("tolerance belongs to hmac-sha256 signatures (GitHub's carry no timestamp)")
        return self


ScheduleName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:#-]{0,127}$")]
CalendarRef = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
# catch_up after a long outage starts at most this many runs (the latest missed fires)
DEFAULT_MAX_CATCH_UP = 10


class _Schedule(_Model):
    """What cron and interval triggers share (server/triggers/schedules.py has the rules).

    `name` identifies the schedule in `baton schedules` and the API; it defaults to the
    workflow's name (`<workflow>#<n>` when a workflow has several). The templates see
    `event` (type `baton.schedule.fired`; `event.data` has schedule, scheduled_at,
    scheduled_local, fired_at, missed, manual); `input` defaults to `{}`."""

    name: ScheduleName | None = None
    timezone: TimeZoneName = "UTC"
    input: Template = None
    workflow_id: Template = None
    # first and last fire (inclusive); a date-time without an offset is read in `timezone`
    start: DayOrInstant | None = None
    end: DayOrInstant | None = None
    # each fire waits a random delay below this bound (spreads load; the schedule time stays nominal)
    jitter: Duration = 0.0
    exclude: list[CalendarRef] = []
    only_within: list[CalendarRef] = []
    on_missed: Literal["skip", "run_once", "catch_up"] = "skip"
    max_catch_up: Annotated[int, Field(ge=1, le=1000)] = DEFAULT_MAX_CATCH_UP
    # the previous run of this schedule is still open: start anyway, skip this fire, start
    # it when that run ends, or cancel that run and start this one. Temporal's default.
    overlap: Literal["allow", "skip", "queue", "cancel_previous"] = "skip"

    @model_validator(mode="after")
    def _coherent(self) -> _Schedule:
        if "max_catch_up" in self.model_fields_set and self.on_missed != "catch_up":
            raise ValueError("max_catch_up applies to on_missed: catch_up")
        for bound in (self.start, self.end):
            if isinstance(bound, datetime) and bound.tzinfo is not None:
                raise ValueError("write start/end without an offset: they are read in the schedule's timezone")
        if self.start is not None and self.end is not None and _as_datetime(self.end) < _as_datetime(self.start):
            raise ValueError(f"end ({self.end}) is before start ({self.start})")
        return self


def _as_datetime(value: date | datetime) -> datetime:
    return value if isinstance(value, datetime) else datetime(value.year, value.month, value.day)


class CronTrigger(_Schedule):
    """Start a run at each time a cron expression names, in `timezone`."""

    schedule: CronText


class EveryTrigger(_Schedule):
    """Start a run every `interval`, on multiples of it counted from `start` (default:
    the Unix epoch, so `15m` fires at :00, :15, :30 and :45)."""

    interval: Annotated[Duration, Field(ge=1)]


TRIGGER_KINDS = ("event", "webhook", "cron", "every")
SCHEDULE_KINDS = ("cron", "every")


class Trigger(_Model):
    event: EventTrigger | None = None
    webhook: WebhookTrigger | None = None
    cron: CronTrigger | None = None
    every: EveryTrigger | None = None

    @property
    def schedule(self) -> CronTrigger | EveryTrigger | None:
        return self.cron or self.every

    @model_validator(mode="after")
    def _one_kind(self) -> Trigger:
        if sum(getattr(self, k) is not None for k in TRIGGER_KINDS) != 1:
            raise ValueError(f"a trigger must have exactly one of {', '.join(TRIGGER_KINDS)}")
        return self


class Workflow(_Model):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
    version: Annotated[
        str,
        BeforeValidator(lambda v: str(v) if isinstance(v, int) and not isinstance(v, bool) else v),
        WithJsonSchema({"type": ["string", "integer"]}),
    ] = "1"
    description: str = ""
    input_schema: dict[str, Any] | None = None
    timeout: Duration | None = None
    concurrency: Concurrency | None = None
    defaults: StepDefaults = StepDefaults()
    triggers: list[Trigger] = Field(default_factory=list)
    steps: list[Step] = Field(min_length=1)
    # The run's result, a template rendered when the run succeeds. Default: the output of
    # the last top-level step that was not skipped.
    output: Template = None


MapSpec.model_rebuild()
Step.model_rebuild()
