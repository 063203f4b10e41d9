"""What the API and CLI may ask of the runtime: the `Orchestrator` protocol.

Views are plain JSON-ready dicts (timestamps are RFC 3339 strings in UTC):

run summary  {"run_id", "workflow", "version", "workflow_id", "status", "attempt",
              "created_at", "updated_at", "finished_at"}
run detail   summary + {"input", "output", "error", "waiting_for": [signal names, "approval:<key>"],
              "trace_id"?, "steps": [step view, ...] in start order}
step view    {"key", "step_id", "kind", "status", "attempt", "output", "error",
              "started_at", "finished_at", "duration_s",
              "compensation": null | {"status", "attempt", "error"}}
history row  {"seq", "at", "type", "key", "data"}
approval     {"id", "run_id", "workflow", "version", "workflow_id", "key", "step_id", "status",
              "message", "approvers", "started_by", "on_reject", "requested_at", "expires_at",
              "link_expires_at", "decided_at", "decided_by", "decided_via", "comment", "link"}
workflow     {"name", "version", "def_hash", "description", "steps": [ids],
              "input_schema", "versions": [...]}
version      {"version", "def_hash", "latest": bool, "description"}
(server/api/views.py has these as pydantic models: the API's response schemas)

Errors are BatonError subclasses (server/errors.py): WorkflowNotFound, RunNotFound,
InvalidInput (with `field`), Conflict, BadRequest, StoreError.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol


class Orchestrator(Protocol):
    webhooks: Any  # the webhook receiver (server/triggers/webhooks.py), None when none is configured
    metrics: Any  # Prometheus metrics (server/telemetry/metrics.py)
    scheduler: Any  # cron and interval triggers (server/triggers/scheduler.py), None when not wired

    @property
    def ready(self) -> bool: ...

    def health(self) -> dict[str, str]:
        """Component states: {"runtime", "store", "nats"}; NATS "disabled" when off."""

    def workflows(self) -> list[dict[str, Any]]: ...

    def workflow(self, name: str) -> dict[str, Any]: ...

    def workflow_versions(self, name: str) -> dict[str, Any]:
        """{"name", "versions": [version view, ...]}: every loaded version, oldest first."""

    def workflow_version(self, name: str, version: str) -> dict[str, Any]:
        """The version a run started with `version` gets: version view + {"name",
        "definition": the workflow as loaded, as JSON}."""

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

    async def trace(self, run_id: str) -> dict[str, Any]:
        """The run's spans rebuilt from its history, open ones with `end` null:
        {"run_id", "trace_id", "spans": [...]}; RunNotFound for an unknown run."""

    async def list_dead_letters(self, *, limit: int = 50, cursor: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        """Events that could not start a run, newest first:
        {"id", "at", "subject", "event_key", "workflow", "error", "headers", "data", "replayed_at", "replay_run"}."""

    async def replay_dead_letter(self, id: int) -> dict[str, Any]:
        """Run the dead letter's event through its trigger again: {"id", "runs": [...]}."""

    async def list_approvals(
        self, *, status: str | None = "pending", run_id: str | None = None, limit: int = 50,
        cursor: str | None = None, links: bool = False,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Approval requests, newest first (approval view; `link` only with links=True)."""

    async def get_approval(self, approval_id: str, *, links: bool = False) -> dict[str, Any]: ...

    async def approval_for_link(self, token: str) -> dict[str, Any]:
        """The request an approval link names; Unauthorized (not our link), Gone (expired)."""

    async def decide_approval(self, approval_id: str, decision: str, *, comment: str | None = None,
                              by: dict[str, Any] | None = None) -> dict[str, Any]:
        """Approve or reject; returns the run summary. Conflict once decided, Gone once expired.
        `by`: {"name", "via": "token" | "link" | "api"}."""

    async def wait(self, run_id: str, timeout_s: float) -> dict[str, Any]:
        """Return the run summary once it is terminal, or as it is when timeout_s passes."""

    async def audit(
        self, actor: str, action: str, *, target: str | None = None, remote: str | None = None,
        status: int | None = None, request_id: str | None = None, detail: dict[str, Any] | None = None,
    ) -> None:
        """Append an entry to the audit log (server/runtime/audit.py); durable on return."""

    async def list_audit(
        self, *, limit: int = 50, cursor: str | None = None, since: float | None = None, until: float | None = None,
        actor: str | None = None, action: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Audit entries, newest first: {"id", "at", "actor", "action", "target", "remote", "status",
        "request_id", "detail"}, and the cursor of the next page."""

    def export_runs(
        self, *, workflow: str | None = None, status: str | None = None, since: float | None = None,
        until: float | None = None, page_size: int = 500,
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Pages of run rows (server/runtime/export.py RUN_COLUMNS) of the runs created in
        [since, until), oldest first; memory stays at about one page."""

    def export_steps(
        self, *, workflow: str | None = None, status: str | None = None, since: float | None = None,
        until: float | None = None, page_size: int = 500,
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Pages of step attempt rows (STEP_COLUMNS) of the same runs: one per attempt."""
