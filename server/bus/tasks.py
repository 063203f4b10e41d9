"""Remote task queues: the wire format that Baton and `baton worker` share.

    baton.tasks.<queue>    Baton -> workers: one message per attempt (JSON, below).
                           Stream BATON_TASKS, work-queue retention: a message is gone
                           once a worker acks it. Every worker of a queue pulls from one
                           durable consumer, `worker-<queue>`, so they compete for tasks.
    baton.results.<queue>  workers -> Baton: started, heartbeat, succeeded, failed.
                           Stream BATON_RESULTS; Baton's durable consumer `baton-results`
                           acks a message only after the event it carries is committed.
    baton.cancel.<queue>   Baton -> workers, core NATS, best effort: stop this attempt.

The README ("Remote workers") documents these formats for workers in other languages;
keep the two in step. Both sides create the streams with the same configuration, so
whichever starts first sets them up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig

from server.engine.commands import ExecuteTask
from server.engine.events import ErrorInfo, Event, TaskFailed, TaskHeartbeat, TaskStarted, TaskSucceeded
from server.errors import BadRequest

# A task waits in its queue until a worker takes it, its step times out or its run
# ends (Baton then deletes it): no age limit, so a queue without workers loses nothing.
# The dedupe window covers a Baton restart re-sending the tasks nobody started yet.
TASKS_STREAM = StreamConfig(
    name="BATON_TASKS", subjects=["baton.tasks.>"], retention=RetentionPolicy.WORK_QUEUE,
    max_age=0, max_bytes=-1, duplicate_window=120.0,
)
# Results wait for Baton while it is down; after a week they are stale anyway (the
# heartbeat deadline has retried those attempts), so they may go.
RESULTS_STREAM = StreamConfig(
    name="BATON_RESULTS", subjects=["baton.results.>"], retention=RetentionPolicy.WORK_QUEUE,
    max_age=7 * 86400.0, max_bytes=-1, duplicate_window=120.0,
)
RESULTS_CONSUMER = "baton-results"
# A worker acks a task as soon as it has told Baton that it started it (milliseconds),
# so a task that a worker took and then died with is offered again soon.
TASK_ACK_WAIT_S = 10.0
# Baton acks a result once committed (a group commit: milliseconds); a slow disk gets
# this long before the message is delivered again (the engine ignores the duplicate).
RESULT_ACK_WAIT_S = 30.0

STARTED, HEARTBEAT, SUCCEEDED, FAILED = "started", "heartbeat", "succeeded", "failed"
RESULT_TYPES = (STARTED, HEARTBEAT, SUCCEEDED, FAILED)


def task_subject(queue: str) -> str:
    return f"baton.tasks.{queue}"


def result_subject(queue: str) -> str:
    return f"baton.results.{queue}"


def cancel_subject(queue: str) -> str:
    return f"baton.cancel.{queue}"


def worker_consumer(queue: str) -> ConsumerConfig:
    """The durable consumer that every worker of `queue` shares (the first one creates it)."""
    return ConsumerConfig(
        durable_name=f"worker-{queue}", filter_subject=task_subject(queue), ack_policy=AckPolicy.EXPLICIT,
        ack_wait=TASK_ACK_WAIT_S,
    )


def results_consumer(max_ack_pending: int, ack_wait_s: float = RESULT_ACK_WAIT_S) -> ConsumerConfig:
    return ConsumerConfig(
        durable_name=RESULTS_CONSUMER, filter_subject="baton.results.>", ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s, max_ack_pending=max_ack_pending,
    )


# --- tasks ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Task:
    """One attempt, as a worker receives it."""

    task_id: str  # also the idempotency key: <run_id>:<step key>:<attempt> (or :compensate:<n>)
    run_id: str
    workflow: str
    version: str
    workflow_id: str | None
    step_id: str
    key: str  # the step instance: the step id, prefixed inside map iterations (`each[3]/load`)
    attempt: int
    queue: str
    handler: str
    input: Any
    compensation: bool
    timeout_s: float | None
    heartbeat_s: float
    deadline: float | None  # unix seconds; past it Baton has failed the attempt already


def encode_task(cmd: ExecuteTask, *, run_id: str, workflow: str, version: str, workflow_id: str | None,
                deadline: float | None) -> bytes:
    return orjson.dumps({
        "task_id": cmd.task_id, "idempotency_key": cmd.task_id, "run_id": run_id, "workflow": workflow,
        "version": version, "workflow_id": workflow_id, "step_id": cmd.step_id, "key": cmd.key,
        "attempt": cmd.attempt, "queue": cmd.queue, "handler": cmd.handler, "input": cmd.input,
        "compensation": cmd.compensation, "timeout_s": cmd.timeout_s, "heartbeat_s": cmd.heartbeat_s,
        "deadline": deadline,
    })


def decode_task(data: bytes) -> Task:
    body = _object(data, "task")
    return Task(
        task_id=_str(body, "task_id"), run_id=_str(body, "run_id"), workflow=_str(body, "workflow"),
        version=_str(body, "version"), workflow_id=_str(body, "workflow_id", optional=True),
        step_id=_str(body, "step_id"), key=_str(body, "key"), attempt=_int(body, "attempt"),
        queue=_str(body, "queue"), handler=_str(body, "handler"), input=body.get("input"),
        compensation=body.get("compensation") is True, timeout_s=_number(body, "timeout_s", optional=True),
        heartbeat_s=_number(body, "heartbeat_s"), deadline=_number(body, "deadline", optional=True),
    )


# --- results ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Result:
    task_id: str
    run_id: str
    type: str  # started | heartbeat | succeeded | failed
    worker: str | None = None
    output: Any = None
    error: ErrorInfo | None = None

    @property
    def terminal(self) -> bool:
        return self.type in (SUCCEEDED, FAILED)

    @property
    def msg_id(self) -> str | None:
        """Nats-Msg-Id: a re-sent outcome is dropped by the stream; heartbeats need none."""
        if self.type == HEARTBEAT:
            return None
        return f"{self.task_id}:{self.type}" + (f":{self.worker}" if self.type == STARTED and self.worker else "")


def encode_result(result: Result) -> bytes:
    body: dict[str, Any] = {"task_id": result.task_id, "run_id": result.run_id, "type": result.type}
    if result.worker is not None:
        body["worker"] = result.worker
    if result.type == SUCCEEDED:
        body["output"] = result.output
    if result.error is not None:
        body["error"] = result.error.to_dict()
    return orjson.dumps(body)


def decode_result(data: bytes) -> Result:
    body = _object(data, "result")
    task_id, run_id, type_ = _str(body, "task_id"), _str(body, "run_id"), _str(body, "type")
    if not task_id.startswith(run_id + ":"):
        raise BadRequest(f"result: task_id {task_id!r} does not belong to run {run_id!r}", field="task_id")
    if type_ not in RESULT_TYPES:
        raise BadRequest(f"result: type must be one of {', '.join(RESULT_TYPES)}, not {type_!r}", field="type")
    error = None
    if type_ == FAILED:
        raw = body.get("error")
        if not isinstance(raw, dict):
            raise BadRequest("result: a failed result needs an `error` object", field="error")
        details = raw.get("details")
        error = ErrorInfo(_str(raw, "type"), _str(raw, "message"), raw.get("retryable", True) is not False,
                          details if isinstance(details, dict) else None)
    return Result(task_id, run_id, type_, _str(body, "worker", optional=True), body.get("output"), error)


def result_event(result: Result, now: float, jitter: float) -> Event:
    """The engine event for a result; `now` is Baton's clock, never the worker's."""
    if result.type == STARTED:
        return TaskStarted(result.task_id, now, result.worker)
    if result.type == HEARTBEAT:
        return TaskHeartbeat(result.task_id, now)
    if result.type == SUCCEEDED:
        return TaskSucceeded(result.task_id, now, result.output)
    assert result.error is not None
    return TaskFailed(result.task_id, now, result.error, jitter)


# --- field checks -----------------------------------------------------------------------


def _object(data: bytes, what: str) -> dict[str, Any]:
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"{what}: not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"{what}: expected a JSON object")
    return body


def _str(body: dict[str, Any], name: str, *, optional: bool = False) -> Any:
    value = body.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value:
        raise BadRequest(f"`{name}` must be a non-empty string", field=name)
    return value


def _int(body: dict[str, Any], name: str) -> int:
    value = body.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"`{name}` must be an integer", field=name)
    return value


def _number(body: dict[str, Any], name: str, *, optional: bool = False) -> Any:
    value = body.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise BadRequest(f"`{name}` must be a number of seconds", field=name)
    return float(value)
