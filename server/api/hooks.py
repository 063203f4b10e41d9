"""`POST /hooks/<path>`: webhook deliveries, authenticated by their signatures.

The route is open to the bearer-token middleware (`role=None`): GitHub and other
senders sign the body with the hook's secret instead (server/triggers/webhooks.py).
Once the signature verifies, the hook itself is the caller (`hook:<path>`), so
history and the audit log name it.

Checks, in order, each with its status: unknown hook 404 (503 while its secret is
missing) → body too large 413 (declared sizes are refused by the error middleware
before the body is read) → not JSON by Content-Type 415 → signature 401 → body does
not parse 400 → the trigger's templates or the workflow's input_schema refuse it 422.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field, RootModel

from server.api.auth import PRINCIPAL, Principal
from server.api.routes import ORCH, json_response
from server.api.table import Param, Route
from server.errors import NotFound, UnsupportedMediaType
from server.triggers.webhooks import Webhooks


class HookPayload(RootModel[Any]):
    """Any JSON: the run's `event.data`, and its input unless the trigger renders one.

    Headers: `X-Hub-Signature-256: sha256=<hex>` (hooks with `signature: github`) or
    `X-Baton-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`
    (`signature: hmac-sha256`); `X-GitHub-Delivery` or `X-Baton-Delivery` makes
    redeliveries start nothing new; `traceparent` makes the run a child of the
    caller's trace."""


class HookRun(BaseModel):
    run_id: str
    workflow: str
    created: bool = Field(description="False when the trigger's workflow_id named a run already open")


class HookAccepted(BaseModel):
    """The delivery was accepted: the runs it started (or started before, if a duplicate)."""

    hook: str
    delivery: str | None = Field(description="The delivery id header's value; null when none was sent")
    runs: list[HookRun] = Field(description="Empty when the trigger's filter declined the delivery")
    duplicate: bool = Field(description="This delivery id was seen before: `runs` are the ones it started then")
    filtered: bool = Field(description="The trigger's filter was false: no run started")


def _webhooks(request: web.Request) -> Webhooks:
    # Set by the wiring (server/app.py) once the runtime has started; None serves no hooks.
    webhooks = request.app[ORCH].webhooks
    if webhooks is None:
        raise NotFound("no webhooks are configured", field="path")
    return webhooks


def _require_json(request: web.Request) -> None:
    media = request.content_type.lower()  # without parameters; application/octet-stream when absent
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return
    sent = request.headers.get("Content-Type")
    hint = (" (GitHub: set the webhook's content type to application/json)"
            if media == "application/x-www-form-urlencoded" else "")
    raise UnsupportedMediaType(
        f"a webhook body must be JSON (Content-Type: application/json), got {sent or 'no Content-Type'}{hint}",
        field="Content-Type")


async def receive_webhook(request: web.Request) -> web.Response:
    webhooks = _webhooks(request)
    hook = webhooks.get(request.match_info["path"])
    _require_json(request)
    body = await request.read()  # a chunked body over the limit raises 413 here
    webhooks.verify(hook, request.headers, body)
    request[PRINCIPAL] = Principal(f"hook:{hook.path}", frozenset(), authenticated=False)
    return json_response(await webhooks.deliver(hook, request.headers, body), status=202)


ROUTES: list[Route] = [
    Route("POST", "/hooks/{path}", receive_webhook, None,
          "Receive a signed webhook delivery and start the hook's workflow", "webhooks",
          body=HookPayload, responses={202: HookAccepted, 401: None, 404: None, 415: None, 503: None},
          params=(Param("path", {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"},
                        "The `path` of a webhook trigger in a workflow file"),)),
]
