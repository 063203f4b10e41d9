"""Where approval requests are announced: a JetStream stream, and a chat webhook.

The CloudEvents `baton.approval.requested` (and `.approved`, `.rejected`,
`.expired`, `.cancelled`) go through the outbox into the stream below: durable,
at least once, deduplicated by id. They carry the link, which decides the request:
restrict `baton.approval.>` with NATS permissions as you would the approver role.

The webhook (`approvals.notify_url`, Slack's incoming-webhook shape `{"text": ...}`,
which Mattermost, Rocket.Chat and others accept too) is best effort: a few bounded
retries after the commit, then a warning in the log. It is not part of the
transaction because it cannot be: a chat server is no party to our commit, and
making it at-least-once would need a delivery table with its own retry loop for a
message whose loss costs little (the request is stored, `baton approvals` lists it
with its link, and the NATS event is durable).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
from nats.js.api import StreamConfig

log = logging.getLogger("baton.approvals")

APPROVALS_STREAM = StreamConfig(name="BATON_APPROVALS", subjects=["baton.approval.>"],
                                max_age=7 * 86400.0, duplicate_window=120.0)

NOTIFY_ATTEMPTS = 3
NOTIFY_BACKOFF_S = (1.0, 3.0)  # between attempts: enough for a chat server's brief hiccup
CLOSE_GRACE_S = 2.0  # how long shutdown waits for notifications still being sent


def notification_text(view: dict[str, Any]) -> str:
    """The chat message. Slack reads `&`, `<` and `>` as markup, so text that came from
    a workflow or a caller is escaped (https://api.slack.com/reference/surfaces/formatting)."""
    lines = [
        f"Approval needed: {_escape(view['message'])}",
        f"{_escape(view['workflow'])}@{_escape(view['version'])}, run {view['run_id']}, step {_escape(view['key'])},"
        f" started by {_escape(view.get('started_by') or 'unknown')}",
    ]
    if view.get("link"):
        until = view.get("link_expires_at")
        lines.append(f"Approve or reject: {view['link']}" + (f" (until {until})" if until else ""))
    return "\n".join(lines)


def _escape(text: Any) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class WebhookNotifier:
    """Posts each new approval request to `url`, in the background."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.sent = 0
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task] = set()

    def notify(self, views: list[dict[str, Any]]) -> None:
        for view in views:
            task = asyncio.create_task(self._send(view), name=f"baton-notify {view['id']}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, view: dict[str, Any]) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        body = {"text": notification_text(view)}
        problem = ""
        for attempt in range(NOTIFY_ATTEMPTS):
            if attempt:
                await asyncio.sleep(NOTIFY_BACKOFF_S[min(attempt, len(NOTIFY_BACKOFF_S)) - 1])
            try:
                async with self._session.post(self.url, json=body) as response:
                    if response.status < 300:
                        self.sent += 1
                        return
                    problem = f"HTTP {response.status}"
                    if response.status < 500 and response.status not in (408, 429):
                        break  # the hook refuses this message: sending it again will not help
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
        log.warning("approval %s: the notification to approvals.notify_url failed (%s); "
                    "the request is still listed by `baton approvals`", view["id"], problem)

    async def close(self) -> None:
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=CLOSE_GRACE_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
