"""Webhook triggers: a signed `POST /hooks/<path>` starts a run, once per delivery.

    request ──> hook for <path>?                          no: 404
            ──> its secret was in the environment at start? no: 503 naming the variable
            ──> (the API checks size and JSON content type: 413, 415)
            ──> signature over the raw body (constant time)  no: 401
            ──> body is JSON?                             no: 400
            ──> delivery id seen before (events table)?   yes: 202, the same run(s), duplicate
            ──> filter, render input and workflow_id       false: 202, no run; error: 422
            ──> start the run under an id derived from (delivery, workflow, trigger)
            ──> record the delivery ──> 202 with the run id

Signatures (the secret is `secret: {env: NAME}`, read once at start-up):

* `github`: `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>`, as GitHub
  sends it. GitHub signs no timestamp, so replays are caught only by the delivery id.
* `hmac-sha256`: `X-Baton-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
  "<t>.<body>">` (Stripe's scheme). Several `v1=` entries may be sent, one per
  secret, so a sender can rotate without a gap; one match is enough. A `t` more
  than `tolerance` (default 5 minutes) from now is refused, which bounds replays.

Exactly once: deliveries carrying `X-GitHub-Delivery` or `X-Baton-Delivery` are
recorded in the same `events` table NATS triggers use (key `hook:<path>:<id>`), and
the run id derives from that key, so a redelivery, even one racing the first,
answers with the same run and starts nothing. A delivery without an id is never
deduplicated: each call starts a run.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from server.definitions.models import WebhookTrigger
from server.definitions.triggers import CompiledWebhookTrigger, compile_webhook_trigger
from server.errors import (
    BadJson, BadRequest, BatonError, ExpressionError, InvalidInput, NotFound, Unauthorized, Unavailable,
)
from server.runtime.runner import Runtime
from server.store.base import Batch, EventRow, Store
from server.triggers.events import event_run_id

log = logging.getLogger("baton.webhooks")

GITHUB_SIGNATURE = "X-Hub-Signature-256"
HMAC_SIGNATURE = "X-Baton-Signature"
DELIVERY_HEADERS = {"github": ("X-GitHub-Delivery", "X-Baton-Delivery"),
                    "hmac-sha256": ("X-Baton-Delivery", "X-GitHub-Delivery")}
# A delivery id is part of a store key: visible ASCII, bounded (GitHub's are 36-char GUIDs).
_DELIVERY_ID = re.compile(r"^[!-~]{1,200}$")
MAX_SIGNATURES = 8  # v1 entries looked at: rotation needs two; more is noise or an attack
_TIMESTAMP = re.compile(r"^\d{1,12}$")
_HEX = re.compile(r"^[0-9a-f]+$")
# Headers kept with the run's event must not carry credentials into history.
_SECRET_HEADER = re.compile(r"authorization|cookie|signature|secret|token|api-?key|password", re.I)
# W3C Trace Context §3.2: version-traceId-parentId-flags, lower-case hex.
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
MAX_TRACESTATE = 512  # §3.3.1.5: vendors may drop a longer one
PRUNE_EVERY_S = 3600.0  # the events table is pruned at most this often (as NATS triggers do)


# --- signatures (pure) -------------------------------------------------------------


def sign_github(secret: bytes, body: bytes) -> str:
    """The `X-Hub-Signature-256` value GitHub sends for this body."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def sign_hmac(secret: bytes, body: bytes, timestamp: int) -> str:
    """The `X-Baton-Signature` value for this body, signed at `timestamp` (unix seconds)."""
    return f"t={timestamp},v1={_hmac_hex(secret, timestamp, body)}"


def verify_github(secret: bytes, body: bytes, header: str | None) -> None:
    """Unauthorized unless `header` is this body's GitHub signature."""
    if not header:
        raise Unauthorized(f"missing {GITHUB_SIGNATURE} header: this hook takes GitHub signatures "
                           f"(`sha256=<hex HMAC-SHA256 of the body>`)", field=GITHUB_SIGNATURE)
    given = header.strip().lower()
    if not given.startswith("sha256=") or not _HEX.match(given[7:]):
        raise Unauthorized(f"{GITHUB_SIGNATURE} must be `sha256=<hex>`", field=GITHUB_SIGNATURE)
    if not hmac.compare_digest(sign_github(secret, body).encode(), given.encode()):
        raise Unauthorized("the signature does not match the body (check the secret, and that the body "
                           "reaches Baton unchanged)", field=GITHUB_SIGNATURE)


def verify_hmac(secret: bytes, body: bytes, header: str | None, now: float, tolerance_s: float) -> None:
    """Unauthorized unless one `v1` of `header` signs `"<t>.<body>"` and `t` is within
    `tolerance_s` of `now`."""
    timestamp, signatures = _parse_hmac_header(header)
    expected = _hmac_hex(secret, timestamp, body).encode()
    # Every entry is compared (no early exit), so timing tells nothing about which matched.
    matched = False
    for candidate in signatures:
        matched |= hmac.compare_digest(expected, candidate.encode())
    if not matched:
        raise Unauthorized("the signature does not match the body (check the secret, that `t` is the one signed, "
                           "and that the body reaches Baton unchanged)", field=HMAC_SIGNATURE)
    age_s = now - timestamp
    if abs(age_s) > tolerance_s:
        when = f"{age_s:.0f}s old" if age_s > 0 else f"{-age_s:.0f}s in the future"
        raise Unauthorized(f"the signature's timestamp is {when}; this hook accepts {tolerance_s:.0f}s either way "
                           "(a replayed or delayed request, or a clock out of sync)", field=HMAC_SIGNATURE)


def _hmac_hex(secret: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(secret, b"%d." % timestamp + body, hashlib.sha256).hexdigest()


def _parse_hmac_header(header: str | None) -> tuple[int, list[str]]:
    shape = "`t=<unix seconds>,v1=<hex HMAC-SHA256 of \"<t>.<body>\">`"
    if not header:
        raise Unauthorized(f"missing {HMAC_SIGNATURE} header: expected {shape}", field=HMAC_SIGNATURE)
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(",")[: MAX_SIGNATURES + 4]:
        key, _, value = part.strip().partition("=")
        value = value.strip()
        if key == "t" and _TIMESTAMP.match(value):
            timestamp = int(value)
        elif key == "v1" and _HEX.match(value.lower()) and len(signatures) < MAX_SIGNATURES:
            signatures.append(value.lower())
        # other keys (a future v2) are ignored, as Stripe's scheme prescribes
    if timestamp is None or not signatures:
        missing = "an integer `t`" if timestamp is None else "a hex `v1`"
        raise Unauthorized(f"{HMAC_SIGNATURE} lacks {missing}: expected {shape}", field=HMAC_SIGNATURE)
    return timestamp, signatures


# --- what a run sees ---------------------------------------------------------------


def delivery_id(headers: Mapping[str, str], signature: str) -> str | None:
    """The sender's id of this delivery (its retries repeat it), or None."""
    for name in DELIVERY_HEADERS[signature]:
        value = headers.get(name)
        if value is None:
            continue
        value = value.strip()
        if not _DELIVERY_ID.match(value):
            raise BadRequest(f"{name} must be 1 to 200 visible ASCII characters", field=name)
        return value
    return None


def webhook_event(path: str, delivery: str | None, data: Any, headers: Mapping[str, str]) -> dict[str, Any]:
    """The run's `event`: the body as `data`, the headers minus anything that carries a
    credential, and the caller's W3C trace context (the key NATS events use too)."""
    kept: dict[str, str] = {}
    for name, value in headers.items():
        name = name.lower()
        if _SECRET_HEADER.search(name):
            continue
        kept[name] = f"{kept[name]}, {value}" if name in kept else value  # RFC 9110 §5.3: one field, joined
    event: dict[str, Any] = {"type": "webhook", "hook": path, "delivery": delivery, "data": data, "headers": kept}
    traceparent = kept.get("traceparent", "").strip()
    if _valid_traceparent(traceparent):
        event["traceparent"] = traceparent
        tracestate = kept.get("tracestate", "").strip()
        if tracestate and len(tracestate) <= MAX_TRACESTATE:
            event["tracestate"] = tracestate
    return event


def _valid_traceparent(value: str) -> bool:
    match = _TRACEPARENT.match(value)
    if match is None:
        return False
    version, trace_id, parent_id, _ = match.groups()
    return version != "ff" and trace_id != "0" * 32 and parent_id != "0" * 16


# --- the registry ------------------------------------------------------------------


@dataclass(frozen=True)
class Hook:
    path: str
    workflow: str
    index: int  # the trigger's place in the workflow's `triggers`
    trigger: WebhookTrigger
    compiled: CompiledWebhookTrigger
    secret: bytes | None = field(repr=False)  # None: its variable was unset or empty at start-up

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        assert self.secret is not None  # Webhooks.get refuses a hook without one
        if self.trigger.signature == "github":
            verify_github(self.secret, body, headers.get(GITHUB_SIGNATURE))
        else:
            verify_hmac(self.secret, body, headers.get(HMAC_SIGNATURE), now, self.trigger.tolerance)


class Webhooks:
    """The webhook triggers of the latest workflow versions, by path (the loader keeps
    paths unique), with their secrets read from the environment once, here."""

    def __init__(self, runtime: Runtime, store: Store, *, dedupe_window_s: float,
                 environ: Mapping[str, str] | None = None) -> None:
        self.runtime, self.store, self.dedupe_window_s = runtime, store, dedupe_window_s
        self.hooks = self._collect(os.environ if environ is None else environ)
        self._last_prune = 0.0

    def _collect(self, environ: Mapping[str, str]) -> dict[str, Hook]:
        hooks: dict[str, Hook] = {}
        catalog = self.runtime.catalog
        for name in catalog.names():
            for i, trigger in enumerate(catalog.latest(name).model.triggers):
                hook = trigger.webhook
                if hook is None:
                    continue
                secret = environ.get(hook.secret.env) or None  # an empty key would sign for anyone
                if secret is None:
                    log.error("webhook /hooks/%s (workflow %r): environment variable %s is not set or empty; "
                              "the hook answers 503 until Baton restarts with it", hook.path, name, hook.secret.env)
                hooks[hook.path] = Hook(hook.path, name, i, hook, compile_webhook_trigger(hook),
                                        None if secret is None else secret.encode())
        if hooks:
            log.info("webhooks: %s", ", ".join(f"/hooks/{p} -> {h.workflow}" for p, h in sorted(hooks.items())))
        return hooks

    def get(self, path: str) -> Hook:
        hook = self.hooks.get(path)
        if hook is None:
            raise NotFound(f"no webhook at /hooks/{path}", field="path")
        if hook.secret is None:
            raise Unavailable(f"webhook /hooks/{path} is unavailable: its secret variable {hook.trigger.secret.env} "
                              "was unset or empty when Baton started")
        return hook

    def verify(self, hook: Hook, headers: Mapping[str, str], body: bytes) -> None:
        try:
            hook.verify(headers, body, self.runtime.clock.now())
        except Unauthorized as exc:
            log.warning("webhook /hooks/%s refused: %s", hook.path, exc.message)
            raise

    async def deliver(self, hook: Hook, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
        """Start the hook's run for a verified delivery: {"hook", "delivery", "runs":
        [{"run_id", "workflow", "created"}], "duplicate", "filtered"}."""
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            message = f"the body is not JSON: line {exc.lineno} column {exc.colno} (char {exc.pos}): {exc.msg}"
            raise BadJson(message) from None
        delivery = delivery_id(headers, hook.trigger.signature)
        key = None if delivery is None else f"hook:{hook.path}:{delivery}"
        if key is not None and (seen := await self.store.get_event(key)) is not None:
            return _answer(hook, delivery, orjson.loads(seen.runs), duplicate=True, filtered=seen.outcome == "unmatched")
        event = webhook_event(hook.path, delivery, data, headers)
        now = self.runtime.clock.now()
        run_id = None if key is None else event_run_id(key, hook.workflow, hook.index)
        runs = await self._start(hook, event, run_id)
        if key is not None:
            outcome = "started" if runs else "unmatched"
            await self.store.commit(Batch(events=[EventRow(key, f"hook:{hook.path}", now, outcome, orjson.dumps(runs))]))
            await self._maybe_prune(now)
        # Not created under the id this delivery derives: a copy racing the first one won.
        duplicate = any(r["run_id"] == run_id and not r["created"] for r in runs)
        return _answer(hook, delivery, runs, duplicate=duplicate, filtered=not runs)

    async def _start(self, hook: Hook, event: dict[str, Any], run_id: str | None) -> list[dict[str, Any]]:
        compiled = hook.compiled
        try:
            part = "filter"
            if not compiled.accepts(event):
                return []
            part = "input"
            input = compiled.render_input(event)
            part = "workflow_id"
            workflow_id = compiled.render_workflow_id(event)
        except ExpressionError as exc:
            # a template that cannot render this body: the body lacks what the trigger reads
            raise InvalidInput(f"webhook /hooks/{hook.path}: the trigger's {part} failed on this body: {exc.message}",
                               field="body") from None
        summary, created = await self.runtime.start_run(
            hook.workflow, input, workflow_id=workflow_id, event=event, by=f"hook:{hook.path}", run_id=run_id)
        return [{"run_id": summary["run_id"], "workflow": hook.workflow, "created": created}]

    async def _maybe_prune(self, now: float) -> None:
        """Forget delivery ids older than the dedupe window (shared with NATS triggers,
        which prune the same table only while they consume)."""
        if now - self._last_prune < PRUNE_EVERY_S:
            return
        self._last_prune = now
        try:
            await self.store.commit(Batch(events_pruned_before=now - self.dedupe_window_s))
        except BatonError as exc:
            log.warning("pruning old delivery records failed: %s", exc.message)


def _answer(hook: Hook, delivery: str | None, runs: list[dict[str, Any]], *, duplicate: bool,
            filtered: bool) -> dict[str, Any]:
    return {"hook": hook.path, "delivery": delivery, "runs": runs, "duplicate": duplicate, "filtered": filtered}
