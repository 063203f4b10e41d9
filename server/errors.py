"""One exception tree for Baton; the API maps each class to an HTTP status in one table.

    BatonError
    ├── DefinitionError          a workflow file is invalid (carries file:line: field: message)
    ├── ExpressionError          a template or condition failed to compile or render
    ├── NotFound
    │   ├── WorkflowNotFound
    │   └── RunNotFound
    ├── InvalidInput             run input does not match the workflow's input_schema
    ├── Conflict                 the request contradicts the run's state (e.g. signal to a finished run)
    │   ├── Stale                a run row written over a revision another decision changed
    │   └── Fenced               a batch fenced by a lease its writer no longer holds
    ├── PayloadTooLarge
    ├── UnsupportedMediaType     a body that is not JSON where JSON is required (webhooks)
    ├── Unauthorized             no valid credentials: bearer token, webhook signature, approval token
    ├── Forbidden                valid credentials without the role the endpoint needs
    ├── Gone                     an approval link past its expiry
    ├── BadRequest               malformed request (e.g. JSON that does not parse)
    │   └── BadJson              a body (HTTP request, NATS signal) that is not JSON
    ├── StoreError               the store failed (disk full, read-only, corrupt)
    ├── Unavailable              shutting down, or not ready: try again later
    │   └── BusError             NATS is unreachable or refused a request
    └── ConfigError              baton.yaml or environment settings are invalid
"""

from __future__ import annotations


class BatonError(Exception):
    code = "error"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict:
        body = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body


class DefinitionError(BatonError):
    code = "invalid_definition"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class ExpressionError(BatonError):
    code = "expression_error"


class NotFound(BatonError):
    code = "not_found"


class WorkflowNotFound(NotFound):
    code = "workflow_not_found"


class RunNotFound(NotFound):
    code = "run_not_found"


class InvalidInput(BatonError):
    code = "invalid_input"


class Conflict(BatonError):
    code = "conflict"


class Stale(Conflict):
    """A run row was committed with a revision that is no longer the stored one: another
    decision (another replica) wrote the run since this one read it."""

    code = "stale"

    def __init__(self, message: str, *, run_id: str | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id  # the run refused, when known: its batch is the one to fail


class Fenced(Conflict):
    """A batch carried a lease fence (name, holder, token) that no longer holds: another
    holder took the lease, or it expired."""

    code = "fenced"


class PayloadTooLarge(BatonError):
    code = "payload_too_large"


class UnsupportedMediaType(BatonError):
    code = "unsupported_media_type"


class Unauthorized(BatonError):
    code = "unauthorized"


class Forbidden(BatonError):
    code = "forbidden"


class Gone(BatonError):
    code = "gone"


class BadRequest(BatonError):
    code = "bad_request"


class BadJson(BadRequest):
    code = "bad_json"


class StoreError(BatonError):
    code = "store_error"


class ConfigError(BatonError):
    code = "invalid_config"


class Unavailable(BatonError):
    """The server is shutting down or its store is failing: try again later."""

    code = "unavailable"


class BusError(Unavailable):
    """NATS is unreachable, timed out, or refused a JetStream request."""

    code = "bus_error"
