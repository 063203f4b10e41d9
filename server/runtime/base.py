"""What the API and CLI may ask of the runtime: the `Orchestrator` protocol.

Views are plain JSON-ready dicts (timestamps are RFC 3339 strings in UTC):

run summary  {"run_id", "workflow", "version", "workflow_id", "status", "attempt",
              "created_at", "updated_at", "finished_at"}
run detail   summary + {"input", "output", "error", "waiting_for": [signal names],
              "trace_id"?, "steps": [step view, ...] in start order}
step view    {"key", "step_id", "kind", "status", "attempt", "output", "error",
              "started_at", "finished_at", "duration_s",
              "compensation": null | {"status", "attempt", "error"}}
history row  {"seq", "at", "type", "key", "data"}
workflow     {"name", "version", "def_hash", "description", "steps": [ids],
              "input_schema", "versions": [...]}

Errors are BatonError subclasses (server/errors.py): WorkflowNotFound, RunNotFound,
InvalidInput (with `field`), Conflict, BadRequest, StoreError.
"""

from __future__ import annotations

from typing import Any, Protocol


class Orchestrator(Protocol):
    @property
    def ready(self) -> bool: ...

    def health(self) -> dict[str, str]:
        """Component states: {"runtime", "store", "nats"}; NATS "disabled" when off."""

    def workflows(self) -> list[dict[str, Any]]: ...

    def workflow(self, name: str) -> dict[str, Any]: ...

    async def start_run(
        self, workflow: str, input: Any, *, workflow_id: str | None = None, version: str | None = None,
        event: Any = None, by: str | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Start a run; returns (run summary, created). A workflow_id that names an
        open run of the same workflow returns that run with created=False."""

    async def signal(self, run_id: str, name: str, payload: Any = None, *, by: str | None = None) -> dict[str, Any]:
        """Deliver a signal; Conflict if the run is finished or nothing waits for `name`."""

    async def cancel(self, run_id: str, *, reason: str = "cancelled", by: str | None = None) -> dict[str, Any]:
        """Conflict if the run is already finished."""

    async def retry(self, run_id: str, *, by: str | None = None) -> dict[str, Any]:
        """Retry a failed, compensated or cancelled run from its failed step; Conflict otherwise."""

    async def get_run(self, run_id: str) -> dict[str, Any]: ...

    async def list_runs(
        self, *, workflow: str | None = None, status: str | None = None, workflow_id: str | None = None,
        since: float | None = None, until: float | None = None, limit: int = 50, cursor: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]: ...

    async def history(self, run_id: str, *, after_seq: int = 0, limit: int = 1000) -> list[dict[str, Any]]: ...

    async def list_dead_letters(self, *, limit: int = 50, cursor: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """Events that could not start a run, newest first:
        {"id", "at", "subject", "event_key", "workflow", "error", "headers", "data", "replayed_at", "replay_run"}."""

    async def replay_dead_letter(self, id: int) -> dict[str, Any]:
        """Run the dead letter's event through its trigger again: {"id", "runs": [...]}."""

    async def wait(self, run_id: str, timeout_s: float) -> dict[str, Any]:
        """Return the run summary once it is terminal, or as it is when timeout_s passes."""
