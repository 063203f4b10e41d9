"""A stand-in CI, deploy API, service health endpoint and Prometheus, for
deploy-with-approval (handlers/examples/deploy.py).

    GET  ci/builds/{ref}               the build of a commit (or tag): passed | failed | running
    POST releases                      {service, version, image}: make `version` the running release
    POST releases/{service}/rollback   {to}: make `to` the running release again (null: none)
    PUT  traffic/{service}             {weights: {version: percent}}: route traffic; answers the previous weights
    GET  services/{service}            what runs: release, previous, weights
    GET  health/{service}              200 {"status": "ok"}, or 503 when the service is switched unhealthy
    GET  prometheus/api/v1/query       an instant vector: the error rate of the service the query names
    POST switches                      {builds, unhealthy, error_rates, lost_answers}: flip the switches below

A build nobody told the stand-in about has passed. A side effect sent again with an
Idempotency-Key it has seen is answered as the first time and not applied again.
`State` has the switches the tests flip: a failed build, an unhealthy service, a high
error rate, lost answers.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from handlers.examples.standins import first_answer

DEFAULT_ERROR_RATE = 0.002  # a healthy service: 0.2% of requests fail
_SERVICE_LABEL = re.compile(r'service="([^"]+)"')


@dataclass
class Service:
    release: str | None = None
    previous: str | None = None
    weights: dict[str, int] = field(default_factory=dict)


@dataclass
class State:
    # what runs before any deploy: `api` at 1.4.1 with all traffic on it
    services: dict[str, Service] = field(
        default_factory=lambda: {"api": Service(release="1.4.1", weights={"1.4.1": 100})})
    # switches the tests (and a curious user) flip
    builds: dict[str, str] = field(default_factory=dict)  # ref -> "failed" | "running" (default: passed)
    unhealthy: set[str] = field(default_factory=set)  # services whose health endpoint answers 503
    error_rates: dict[str, float] = field(default_factory=dict)  # service -> fraction of failing requests
    # the next N side effects are applied, but answered 504 (a proxy that gave up waiting):
    # the caller retries, and its Idempotency-Key keeps the change from being made twice
    lost_answers: int = 0
    # what was asked, in order: {"method", "path", "body", "key"}
    calls: list[dict[str, Any]] = field(default_factory=list)
    _answers: dict[str, tuple[int, Any]] = field(default_factory=dict)  # Idempotency-Key -> first answer
    _lock: threading.RLock = field(default_factory=threading.RLock)

    def side_effects(self) -> list[tuple[str, str, Any]]:
        """The requests that changed something, in order: (method, path, body); repeats by key left out."""
        with self._lock:
            return [(c["method"], c["path"], c["body"]) for c in self.calls if c["method"] != "GET" and not c["repeat"]]

    def service(self, name: str) -> Service:
        return self.services.setdefault(name, Service())


def make_app(state: State) -> web.Application:
    routes = web.RouteTableDef()

    @routes.get("/ci/builds/{ref}")
    async def build(request: web.Request) -> web.Response:
        ref = request.match_info["ref"]
        _record(state, request, None)
        status = state.builds.get(ref, "passed")
        answer = {"ref": ref, "status": status, "finished_at": None if status == "running" else time.time()}
        if status == "passed":
            digest = hashlib.sha256(ref.encode()).hexdigest()
            answer["image"] = f"registry.local/{request.query.get('service', 'app')}@sha256:{digest}"
        return web.json_response(answer)

    @routes.post("/releases")
    async def release(request: web.Request) -> web.Response:
        body = await request.json()
        def apply() -> tuple[int, Any]:
            name, version = body["service"], body["version"]
            svc = state.service(name)
            previous = svc.release
            if previous != version:
                svc.previous, svc.release = previous, version
            health = request.url.with_path(request.path.rsplit("/releases", 1)[0] + f"/health/{name}")
            return 201, {"service": name, "version": version, "previous": previous, "health_url": str(health)}
        return await _once(state, request, body, apply)

    @routes.post("/releases/{service}/rollback")
    async def rollback(request: web.Request) -> web.Response:
        body = await request.json()
        def apply() -> tuple[int, Any]:
            svc = state.service(request.match_info["service"])
            rolled_back = svc.release
            svc.release, svc.previous = body.get("to"), None
            return 200, {"service": request.match_info["service"], "release": svc.release, "rolled_back": rolled_back}
        return await _once(state, request, body, apply)

    @routes.put("/traffic/{service}")
    async def traffic(request: web.Request) -> web.Response:
        body = await request.json()
        def apply() -> tuple[int, Any]:
            svc = state.service(request.match_info["service"])
            previous, svc.weights = svc.weights, {str(k): int(v) for k, v in body["weights"].items()}
            return 200, {"service": request.match_info["service"], "weights": svc.weights, "previous": previous}
        return await _once(state, request, body, apply)

    @routes.get("/services/{service}")
    async def show(request: web.Request) -> web.Response:
        svc = state.services.get(request.match_info["service"])
        if svc is None:
            return web.json_response({"error": "no such service"}, status=404)
        return web.json_response({"release": svc.release, "previous": svc.previous, "weights": svc.weights})

    @routes.get("/health/{service}")
    async def health(request: web.Request) -> web.Response:
        name = request.match_info["service"]
        _record(state, request, None)
        if name in state.unhealthy:
            return web.json_response({"status": "failing", "checks": {"db": "timeout"}}, status=503)
        return web.json_response({"status": "ok", "version": state.service(name).release})

    @routes.get("/prometheus/api/v1/query")
    async def query(request: web.Request) -> web.Response:
        # The Prometheus HTTP API's answer to an instant query, for the one series asked for.
        promql = request.query.get("query", "")
        _record(state, request, None)
        found = _SERVICE_LABEL.search(promql)
        if found is None:
            return web.json_response({"status": "error", "errorType": "bad_data",
                                      "error": "the stand-in answers queries naming a service label"}, status=400)
        rate = state.error_rates.get(found.group(1), DEFAULT_ERROR_RATE)
        return web.json_response({"status": "success", "data": {"resultType": "vector", "result": [
            {"metric": {"service": found.group(1)}, "value": [time.time(), repr(rate)]}]}})

    @routes.post("/switches")
    async def switches(request: web.Request) -> web.Response:
        # to try a failure by hand: curl -X POST .../deploy/switches -d '{"unhealthy": ["api"]}'
        body = await request.json()
        with state._lock:
            state.builds.update(body.get("builds", {}))
            if "unhealthy" in body:
                state.unhealthy = set(body["unhealthy"])
            state.error_rates.update(body.get("error_rates", {}))
            state.lost_answers = int(body.get("lost_answers", state.lost_answers))
            answer = {"builds": state.builds, "unhealthy": sorted(state.unhealthy), "error_rates": state.error_rates,
                      "lost_answers": state.lost_answers}
        return web.json_response(answer)

    app = web.Application()
    app.add_routes(routes)
    return app


def _record(state: State, request: web.Request, body: Any, repeat: bool = False) -> None:
    with state._lock:
        state.calls.append({"method": request.method, "path": request.path, "body": body,
                            "key": request.headers.get("Idempotency-Key"), "repeat": repeat})


async def _once(state: State, request: web.Request, body: Any,
                apply: Callable[[], tuple[int, Any]]) -> web.Response:
    """Apply a side effect once per Idempotency-Key; a repeat gets the first answer."""
    seen, repeat = first_answer(state._lock, state._answers, request.headers.get("Idempotency-Key"), apply)
    with state._lock:
        _record(state, request, body, repeat)
        if not repeat and state.lost_answers > 0:
            state.lost_answers -= 1
            return web.json_response({"error": "gateway timeout"}, status=504)
    status, answer = seen
    return web.json_response(answer, status=status)
