"""Stand-in incident tooling: an alert enrichment service (owner team, runbook, recent
deploys), a remediation API (restart, rollback) with health checks, and chat channels
that take Slack's incoming-webhook body `{"text": ...}`.

    POST /enrich                   {"service", "alert", ...} -> {"team", "runbook", "recent_deploys"}
    POST /mitigations              {"service", "action", "version"?}; Idempotency-Key -> {"id", ...}
    GET  /services/{service}/health                          -> {"service", "healthy"}
    POST /chat/{channel}           {"text": ...}; Idempotency-Key -> {"ok": true}
    GET  /chat/{channel}           the channel's messages, oldest first (look at them with curl)

A service is unhealthy until a mitigation was applied to it. A repeated
Idempotency-Key is answered with the first answer and changes nothing, as payment
and paging APIs do. Every request's W3C `traceparent` is recorded, so a test can see
the calls join the run's trace.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from handlers.examples.standins import first_answer

# What the enrichment service knows; anything else is "unowned", with the generic runbook.
CATALOGUE: dict[str, dict[str, Any]] = {
    "checkout": {"team": "payments", "runbook": "https://runbooks.example.com/checkout",
                 "recent_deploys": [{"version": "2.4.1", "previous": "2.4.0", "by": "ci", "minutes_ago": 12}]},
    "search": {"team": "discovery", "runbook": "https://runbooks.example.com/search", "recent_deploys": []},
}
UNOWNED = {"team": "unowned", "runbook": "https://runbooks.example.com/generic", "recent_deploys": []}


@dataclass
class State:
    catalogue: dict[str, dict[str, Any]] = field(default_factory=lambda: dict(CATALOGUE))
    messages: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # channel -> [{"text", "key"}]
    mitigations: list[dict[str, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)  # {"method", "path" (full), "traceparent"}
    # switches for the tests
    fail_mitigation: bool = False          # 503 on every mitigation: the step retries, then fails
    stays_unhealthy: set[str] = field(default_factory=set)  # services a mitigation does not heal
    _answers: dict[str, Any] = field(default_factory=dict)  # Idempotency-Key -> first answer
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def texts(self, channel: str) -> list[str]:
        with self._lock:
            return [m["text"] for m in self.messages.get(channel, [])]

    def traceparents(self, path_end: str) -> list[str | None]:
        """The `traceparent` of each request whose path ends with `path_end` (the mount prefix varies)."""
        with self._lock:
            return [r["traceparent"] for r in self.requests if r["path"].endswith(path_end)]

    def healthy(self, service: str) -> bool:
        with self._lock:
            return service not in self.stays_unhealthy and any(m["service"] == service for m in self.mitigations)


def make_app(state: State) -> web.Application:
    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        with state._lock:
            state.requests.append({"method": request.method, "path": request.path,
                                   "traceparent": request.headers.get("traceparent")})
        return await handler(request)

    async def body(request: web.Request) -> dict[str, Any]:
        try:
            data = await request.json()
        except ValueError:
            raise web.HTTPBadRequest(text="the body is not JSON") from None
        if not isinstance(data, dict):
            raise web.HTTPBadRequest(text="the body must be a JSON object")
        return data

    def once(request: web.Request, make: Any) -> web.Response:
        answer, _ = first_answer(state._lock, state._answers, request.headers.get("Idempotency-Key"), make)
        return web.json_response(answer)

    async def enrich(request: web.Request) -> web.Response:
        data = await body(request)
        service = data.get("service")
        if not isinstance(service, str) or not service:
            return web.json_response({"error": "service is required"}, status=400)
        known = state.catalogue.get(service, UNOWNED)
        return web.json_response({"service": service, **known})

    async def mitigate(request: web.Request) -> web.Response:
        data = await body(request)
        if data.get("action") not in ("restart", "rollback") or not data.get("service"):
            return web.json_response({"error": "service and action (restart or rollback) are required"}, status=400)
        if state.fail_mitigation:
            return web.json_response({"error": "the orchestrator is unavailable"}, status=503)

        def apply() -> dict[str, Any]:
            key = request.headers.get("Idempotency-Key") or str(len(state.mitigations))
            mitigation = {"id": "mit_" + hashlib.sha256(key.encode()).hexdigest()[:12], "service": data["service"],
                          "action": data["action"], "version": data.get("version"), "alert": data.get("alert"),
                          "status": "done"}
            state.mitigations.append(mitigation)
            return mitigation
        return once(request, apply)

    async def health(request: web.Request) -> web.Response:
        service = request.match_info["service"]
        return web.json_response({"service": service, "healthy": state.healthy(service)})

    async def post_chat(request: web.Request) -> web.Response:
        data = await body(request)
        if not isinstance(data.get("text"), str):
            return web.json_response({"error": "text is required"}, status=400)
        channel = request.match_info["channel"]

        def post() -> dict[str, Any]:
            state.messages.setdefault(channel, []).append(
                {"text": data["text"], "key": request.headers.get("Idempotency-Key")})
            return {"ok": True}
        return once(request, post)

    async def read_chat(request: web.Request) -> web.Response:
        return web.json_response({"messages": state.texts(request.match_info["channel"])})

    app = web.Application(middlewares=[record])
    app.router.add_post("/enrich", enrich)
    app.router.add_post("/mitigations", mitigate)
    app.router.add_get("/services/{service}/health", health)
    app.router.add_post("/chat/{channel}", post_chat)
    app.router.add_get("/chat/{channel}", read_chat)
    return app
