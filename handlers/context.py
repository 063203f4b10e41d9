"""What a handler receives (`Context`) and how it says "do not retry" (`NonRetryableError`).

Any other exception a handler raises is retried under the step's retry policy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

HANDLER_LOGGER = logging.getLogger("baton.handler")


class NonRetryableError(Exception):
    """Fail the step now, without further attempts.

    `type` overrides the error type name reported for the step (default: the class
    name), so a handler can report e.g. "PaymentDeclined" without declaring a class.
    """

    def __init__(
        self, message: str = "", *, type: str | None = None, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.type = type
        self.details = details


def error_type_name(exc: BaseException) -> str:
    """The error type reported for a failed attempt: `NonRetryableError.type` if set, else the class name."""
    if isinstance(exc, NonRetryableError) and exc.type:
        return exc.type
    return type(exc).__name__


def idempotency_key(run_id: str, step_id: str, attempt: int) -> str:
    """The key handed to one attempt: `<run_id>:<step_id>:<attempt>`."""
    return f"{run_id}:{step_id}:{attempt}"


class _AttemptLogger(logging.LoggerAdapter[logging.Logger]):
    """Keeps a call's own `extra` fields (`ctx.logger.info("paid", extra={"order": id})`)
    beside the attempt's identifiers, which win on a clash; the stdlib adapter drops
    them before Python 3.13 (`merge_extra`)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        own = kwargs.get("extra")
        kwargs["extra"] = {**own, **self.extra} if own else self.extra
        return msg, kwargs


def handler_logger(
    *, workflow: str, run_id: str, step_id: str, task_id: str, attempt: int
) -> logging.LoggerAdapter[logging.Logger]:
    """A `baton.handler` logger whose records carry the attempt's identifiers as `extra`."""
    extra = {"workflow": workflow, "run_id": run_id, "step_id": step_id, "task_id": task_id, "attempt": attempt}
    return _AttemptLogger(HANDLER_LOGGER, extra)


@dataclass(frozen=True, slots=True)
class Context:
    """One handler attempt. Built by the server for every attempt, so construction is
    just field assignment; the logger adapter is created on first use."""

    workflow: str
    version: str
    workflow_id: str | None
    run_id: str
    step_id: str
    task_id: str
    attempt: int  # 1-based
    idempotency_key: str
    compensation: bool = False  # this call undoes a completed step
    deadline: float | None = None  # unix seconds; the attempt is cancelled after it
    # W3C `traceparent` of this attempt's span (None when tracing is off): outgoing
    # `http.request` and `nats.*` calls carry it, so what they start joins the run's trace
    traceparent: str | None = None
    _logger: logging.LoggerAdapter[logging.Logger] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        if self._logger is None:
            adapter = handler_logger(
                workflow=self.workflow,
                run_id=self.run_id,
                step_id=self.step_id,
                task_id=self.task_id,
                attempt=self.attempt,
            )
            # Frozen only guards the public fields; caching the adapter is not a state change.
            object.__setattr__(self, "_logger", adapter)
            return adapter
        return self._logger
