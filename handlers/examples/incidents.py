"""Incident response: enrich an alert, post to chat channels, mitigate, verify recovery.

The services are reached over HTTP with aiohttp, as a team's own glue code would:
the enrichment, remediation and health APIs at INCIDENT_API_URL (default: the
stand-ins of `python -m handlers.examples.standins`), and each chat channel at the
Slack-compatible incoming webhook in INCIDENT_CHAT_<CHANNEL>_URL (e.g.
INCIDENT_CHAT_ONCALL_URL), else at `<INCIDENT_API_URL>/chat/<channel>`.

Every call carries the step's W3C `traceparent`, so what the services do joins the
run's trace, and calls with a side effect carry an `Idempotency-Key` that is the same
for every attempt of the step: a retried attempt does not restart a service twice or
post a message twice.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

import aiohttp

from handlers.context import Context, NonRetryableError
from handlers.registry import handler

DEFAULT_API_URL = "http://127.0.0.1:8090/incidents"
REQUEST_TIMEOUT_S = 10.0  # each call; the step's own timeout bounds the attempt
RETRYABLE_4XX = frozenset({408, 429})


class ServiceError(Exception):
    """A failure that may pass (5xx, no answer): the step retries."""


class StillUnhealthy(Exception):
    """The service has not recovered yet: retried, so `verify` polls with backoff."""


def api_url() -> str:
    return os.environ.get("INCIDENT_API_URL", DEFAULT_API_URL).rstrip("/")


def channel_url(channel: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", channel):
        raise NonRetryableError(f"bad channel name {channel!r}", type="BadChannel")
    return os.environ.get(f"INCIDENT_CHAT_{channel.upper().replace('-', '_')}_URL") or f"{api_url()}/chat/{channel}"


def stable_key(ctx: Context) -> str:
    # Per run and step, not ctx.idempotency_key (which counts attempts): a retry must be
    # recognised as the same request. A compensation is a request of its own.
    kind = "undo" if ctx.compensation else "do"
    return hashlib.sha256(f"{ctx.run_id}:{ctx.step_id}:{kind}".encode()).hexdigest()[:32]


async def call(ctx: Context, method: str, url: str, body: Any = None, *, key: bool = False) -> Any:
    headers = {"Idempotency-Key": stable_key(ctx)} if key else {}
    if ctx.traceparent:
        headers["traceparent"] = ctx.traceparent
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as session:
            async with session.request(method, url, json=body, headers=headers) as resp:
                text = await resp.text()
                if resp.status >= 500 or resp.status in RETRYABLE_4XX:
                    raise ServiceError(f"{method} {url}: HTTP {resp.status}: {text[:300]}")
                if resp.status >= 400:
                    raise NonRetryableError(f"{method} {url}: HTTP {resp.status}: {text[:300]}", type="HttpError")
                return await resp.json(content_type=None) if text else None
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ServiceError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc


@handler("incidents.enrich")
async def enrich(
    ctx: Context, service: str, alert: str, severity: str | None = None, labels: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Who owns the service, its runbook, and what was deployed lately."""
    found = await call(ctx, "POST", f"{api_url()}/enrich",
                       {"service": service, "alert": alert, "severity": severity, "labels": labels or {}})
    deploys = found.get("recent_deploys") or []
    return {"team": found.get("team", "unowned"), "runbook": found.get("runbook"), "recent_deploys": deploys,
            # a fresh deploy is the usual suspect: roll it back; otherwise restart
            "action": "rollback" if deploys else "restart",
            "rollback_to": deploys[0].get("previous") if deploys else None}


@handler("incidents.notify")
async def notify(ctx: Context, channel: str, text: str) -> dict[str, Any]:
    """Post `text` to a chat channel's incoming webhook."""
    await call(ctx, "POST", channel_url(channel), {"text": text}, key=True)
    ctx.logger.info("posted to #%s", channel)
    return {"channel": channel, "text": text}


@handler("incidents.mitigate")
async def mitigate(
    ctx: Context, service: str, action: str, version: str | None = None, alert: str | None = None
) -> dict[str, Any]:
    """Restart the service, or roll it back to `version`."""
    if action not in ("restart", "rollback"):
        raise NonRetryableError(f"unknown action {action!r} (restart or rollback)", type="BadAction")
    done = await call(ctx, "POST", f"{api_url()}/mitigations",
                      {"service": service, "action": action, "version": version, "alert": alert}, key=True)
    ctx.logger.info("%s of %s: %s", action, service, done.get("id"))
    return done


@handler("incidents.verify")
async def verify(ctx: Context, service: str) -> dict[str, Any]:
    """The service's health check passes; until it does, the attempt fails and is retried."""
    health = await call(ctx, "GET", f"{api_url()}/services/{service}/health")
    if not health.get("healthy"):
        raise StillUnhealthy(f"{service} is not healthy yet")
    return health
