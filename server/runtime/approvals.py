"""Approval requests outside the engine: stored rows, signed links, and their views.

The engine notes `approval.requested`, `approval.timed_out` and `approval.cancelled`
and takes `ApprovalDecided` events (server/engine/decide.py, rule 8). From those,
`approval_changes` derives what the same batch must write: the approval row (so a
request is stored exactly when its step waits, and closed exactly when it stops),
and, when NATS is on, CloudEvents in the outbox (`baton.approval.requested` with
the link, `baton.approval.<status>` when it closes), durable and at least once.

Links are `<public_url>/v1/approvals/<token>`. The token is an itsdangerous
`URLSafeSerializer` signature (HMAC-SHA256, salt "baton-approval") over
`{"id": <approval id>, "exp": <unix seconds>}`:

* a token that does not verify (altered, or signed with another key) -> 401;
* `exp` passed -> 410. `exp` is the approval's timeout, or `approvals.link_ttl_s`
  after the request when it has none (the request may still be decided through
  the API then, by an approver);
* single use comes from the row, not the token: a decided request -> 409.

The token names a request and carries nothing secret; its signature is the credential.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import orjson
from itsdangerous import BadSignature, URLSafeSerializer

from server.bus.cloudevents import make_event
from server.engine.commands import Command, Record
from server.engine.events import ApprovalDecided, Event
from server.engine.state import RunState
from server.errors import BatonError, ConfigError, Conflict, Gone, Unauthorized
from server.runtime.clock import iso
from server.runtime.lifecycle import run_traceparent
from server.store.base import ApprovalClosed, ApprovalRow, Batch, OutboxRow

log = logging.getLogger("baton.approvals")

SALT = "baton-approval"  # a signature made for anything else never verifies here
KEY_FILE = "approval.key"
CLOSED_STATUS = {"approve": "approved", "reject": "rejected"}


class ApprovalLinks:
    """Signs and checks approval links."""

    def __init__(self, secret: str, base_url: str, link_ttl_s: float) -> None:
        self._serializer = URLSafeSerializer(secret, salt=SALT, signer_kwargs={"digest_method": hashlib.sha256})
        self.base_url = base_url.rstrip("/")
        self.link_ttl_s = link_ttl_s

    def expiry(self, requested_at: float, expires_at: float | None) -> float:
        return expires_at if expires_at is not None else requested_at + self.link_ttl_s

    def token(self, approval_id: str, exp: float) -> str:
        return self._serializer.dumps({"id": approval_id, "exp": exp})

    def link(self, approval_id: str, exp: float) -> str:
        return f"{self.base_url}/v1/approvals/{self.token(approval_id, exp)}"

    def verify(self, token: str, now: float) -> str:
        """The approval id the token names; Unauthorized if it is not ours, Gone once expired."""
        try:
            payload = self._serializer.loads(token)
        except BadSignature:
            raise Unauthorized("this approval link is not valid: it was altered, or signed with another key",
                               field="token") from None
        approval_id, exp = (payload.get("id"), payload.get("exp")) if isinstance(payload, dict) else (None, None)
        if not isinstance(approval_id, str) or isinstance(exp, bool) or not isinstance(exp, (int, float)):
            raise Unauthorized("this approval link is not valid", field="token")
        if now >= exp:
            raise Gone(f"this approval link expired at {iso(exp)}", field="token")
        return approval_id


def load_secret(configured: str | None, data_dir: Path) -> str:
    """The signing key: the configured one, else `<data_dir>/approval.key`, made once
    (mode 0600) so that links keep working across restarts."""
    if configured:
        return configured
    path = data_dir / KEY_FILE
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # made by an earlier start (or a concurrent one)
            secret = path.read_text(encoding="utf-8").strip()
        else:
            secret = secrets.token_urlsafe(32)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(secret + "\n")
            log.info("made a new approval link key in %s", path)
    except OSError as exc:
        raise ConfigError(f"cannot read or create the approval link key {path}: {exc}") from None
    if not secret:
        raise ConfigError(f"the approval link key file {path} is empty: delete it to make a new one "
                          "(links already sent stop working), or set approvals.secret")
    return secret


# --------------------------------------------------------------- derived rows


def approval_changes(state: RunState, event: Event, commands: list[Command], batch: Batch,
                     links: ApprovalLinks | None, publish: bool) -> list[dict[str, Any]]:
    """Add to `batch` what `event` did to the run's approval requests; return the views
    (with links) of the requests it opened, to notify people after the commit."""
    opened: list[dict[str, Any]] = []
    closed: list[ApprovalClosed] = []
    ignored = False  # a decision for a request no longer pending changes nothing
    for cmd in commands:
        if not isinstance(cmd, Record) or not cmd.type.startswith("approval."):
            continue
        if cmd.type == "approval.requested":
            row = _requested_row(state, cmd, event.at, links)
            batch.approvals.append(row)
            opened.append(approval_view(row, links, with_link=True))
        elif cmd.type == "approval.timed_out":
            closed.append(ApprovalClosed(cmd.data["id"], "expired", event.at, None, "timeout"))
        elif cmd.type == "approval.cancelled":
            closed.append(ApprovalClosed(cmd.data["id"], "cancelled", event.at))
        elif cmd.type == "approval.ignored":
            ignored = True
    if isinstance(event, ApprovalDecided) and not ignored:
        by = event.by or {}
        closed.append(ApprovalClosed(f"{state.run_id}:{event.key}:{event.attempt}", CLOSED_STATUS[event.decision],
                                     event.at, by.get("name"), by.get("via"), event.comment))
    batch.approvals_closed += closed
    if publish:
        batch.outbox += [_event_row(state, "requested", view, event.at) for view in opened]
        batch.outbox += [_event_row(state, c.status, _closed_data(state, c), event.at) for c in closed]
    return opened


def _requested_row(state: RunState, note: Record, at: float, links: ApprovalLinks | None) -> ApprovalRow:
    data = note.data
    expires_at = data["expires_at"]
    link_expires_at = links.expiry(at, expires_at) if links is not None else expires_at
    body = {"workflow": state.workflow, "version": state.version, "workflow_id": state.workflow_id,
            "started_by": state.started_by, "message": data["message"], "approvers": data["approvers"],
            "attempt": data["attempt"], "on_timeout": data["on_timeout"], "on_reject": data["on_reject"],
            "link_expires_at": link_expires_at}
    return ApprovalRow(data["id"], state.run_id, note.key, state.steps[note.key].step_id, "pending", at, expires_at,
                       data=orjson.dumps(body))


def _closed_data(state: RunState, closed: ApprovalClosed) -> dict[str, Any]:
    key = closed.id[len(state.run_id) + 1:].rpartition(":")[0]
    return {"id": closed.id, "run_id": state.run_id, "workflow": state.workflow, "version": state.version,
            "workflow_id": state.workflow_id, "key": key, "step_id": key.rpartition("/")[2], "status": closed.status,
            "decided_at": iso(closed.decided_at), "decided_by": closed.decided_by, "decided_via": closed.decided_via,
            "comment": closed.comment}


def _event_row(state: RunState, what: str, data: dict[str, Any], at: float) -> OutboxRow:
    # one id per request and outcome: a re-publish after a crash is dropped by the stream
    id_ = f"{data['id']}:{what}"
    headers = orjson.dumps({"traceparent": run_traceparent(state.run_id, state.event, state.attempt),
                            "Baton-Run-Id": state.run_id})
    return OutboxRow(None, f"baton.approval.{what}", id_, headers, make_event(f"baton.approval.{what}", id_,
                                                                               state.run_id, data, at))


# ----------------------------------------------------------------------- views


def approval_view(row: ApprovalRow, links: ApprovalLinks | None, *, with_link: bool) -> dict[str, Any]:
    """The API's view of a request. `link` is the credential that decides it: only for
    callers who may decide (approvers), and only while it is pending."""
    data = orjson.loads(row.data)
    link_expires_at = data.get("link_expires_at")
    link = None
    if with_link and links is not None and row.status == "pending" and link_expires_at is not None:
        link = links.link(row.id, link_expires_at)
    return {
        "id": row.id, "run_id": row.run_id, "workflow": data.get("workflow"), "version": data.get("version"),
        "workflow_id": data.get("workflow_id"), "key": row.key, "step_id": row.step_id, "status": row.status,
        "message": data.get("message"), "approvers": data.get("approvers", []), "started_by": data.get("started_by"),
        "on_reject": data.get("on_reject"), "requested_at": iso(row.requested_at),
        "expires_at": iso(row.expires_at), "link_expires_at": iso(link_expires_at),
        "decided_at": iso(row.decided_at), "decided_by": row.decided_by, "decided_via": row.decided_via,
        "comment": row.comment, "link": link,
    }


def attempt_of(row: ApprovalRow) -> int:
    return int(row.id.rpartition(":")[2])


def closed_error(row: ApprovalRow | None, approval_id: str) -> BatonError:
    """Why a request cannot be decided any more: 410 once expired, else 409."""
    if row is None or row.status == "pending":  # decided a moment ago, not yet committed
        return Conflict(f"approval {approval_id} was already decided")
    if row.status == "expired":
        return Gone(f"approval {approval_id} expired at {iso(row.decided_at)} (no decision before its timeout)")
    if row.status == "cancelled":
        return Conflict(f"approval {approval_id} was cancelled: its run stopped waiting at {iso(row.decided_at)}")
    who = f" by {row.decided_by}" if row.decided_by else ""
    return Conflict(f"approval {approval_id} was already {row.status}{who} at {iso(row.decided_at)}")
