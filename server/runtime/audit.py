"""The audit log: who did what, when, from where, and how it ended.

Entries are appended through the store's `commit` (`Batch.audit`), so they ride the
same group commit as run transitions: no second writer, and an entry is durable when
`Runtime.audit` returns. Who writes them:

* the API's audit middleware (server/api/audit.py): every mutating call that
  matched a route, refused ones included (401, 403, 404, 409 ...);
* the runtime: `definition.loaded` when it stores a definition it has not seen
  (a new file, or an edited one: a new def_hash), with actor `system`;
* anything else that changes what Baton will do (schedules, when they come) calls
  `Runtime.audit(actor, action, ...)`.

An entry as the API shows it:
  {"id", "at", "actor", "action", "target", "remote", "status", "request_id", "detail": {...}}
"""

from __future__ import annotations

from typing import Any

import orjson

from server.runtime.clock import iso
from server.store.base import AuditRow, Store, parse_id

SYSTEM = "system"  # the actor of what Baton does by itself (loading definitions, schedules)


def audit_row(at: float, actor: str, action: str, *, target: str | None = None, remote: str | None = None,
              status: int | None = None, request_id: str | None = None,
              detail: dict[str, Any] | None = None) -> AuditRow:
    return AuditRow(None, at, actor, action, target, remote, status, request_id, orjson.dumps(detail or {}))


def audit_view(row: AuditRow) -> dict[str, Any]:
    return {"id": row.id, "at": iso(row.at), "actor": row.actor, "action": row.action, "target": row.target,
            "remote": row.remote, "status": row.status, "request_id": row.request_id,
            "detail": orjson.loads(row.detail)}


async def list_audit(store: Store, *, limit: int = 50, cursor: str | None = None, since: float | None = None,
                     until: float | None = None, actor: str | None = None,
                     action: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """A page of entries, newest first, and the cursor of the next (None on the last page).
    The cursor is the id the next page starts below: ids are never reused, so it stays valid."""
    before = None if cursor is None else parse_id(cursor, "cursor")
    rows = await store.list_audit(limit=limit + 1, before_id=before, since=since, until=until, actor=actor,
                                  action=action)
    more = len(rows) > limit
    del rows[limit:]
    return [audit_view(r) for r in rows], (str(rows[-1].id) if more else None)
