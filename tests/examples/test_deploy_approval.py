"""deploy-with-approval end to end: a signed CI webhook starts it; the build must have
passed; a person approves through the link; the release is applied and traffic shifted;
a health check and an error-rate check run in parallel; a failure restores traffic and
rolls the release back, in that order; deploys.<service>.* notifications go out on NATS.

The CI, deploy API, health endpoint and Prometheus are the stand-ins of
handlers/examples/standins/deploy.py; NATS and the server are real."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import nats
import pytest

from tests.examples.support import ExampleServer, StandInServices, off_loop

WORKFLOW = "deploy-with-approval"
SECRET = "ci-secret-of-this-test"
SHA = "9f3c2e1a7b5d"
IMAGE = f"registry.local/api@sha256:{hashlib.sha256(SHA.encode()).hexdigest()}"  # as the stand-in CI names it
WAIT_S = 60.0  # generous: a loaded two-core machine


# --- the parts ------------------------------------------------------------------------


@pytest.fixture
def standins() -> Iterator[StandInServices]:
    with StandInServices("deploy") as services:
        yield services


@pytest.fixture
def server(tmp_path, nats_server, standins) -> Iterator[ExampleServer]:
    server = ExampleServer(tmp_path / "baton", nats_server.url,
                           DEPLOY_API_URL=standins.base("deploy"), CI_WEBHOOK_SECRET=SECRET)
    server.env["BATON_PUBLIC_URL"] = server.url  # approval links point at this server
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Notifications:
    """What a team's chat bot would see: every message on deploys.>, in order."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        self._arrived = asyncio.Queue[None]()

    async def got(self, msg: Any) -> None:
        self.received.append((msg.subject, json.loads(msg.data)))
        self._arrived.put_nowait(None)

    async def wait_for(self, subject: str) -> list[tuple[str, dict[str, Any]]]:
        async with asyncio.timeout(WAIT_S):
            while subject not in [s for s, _ in self.received]:
                await self._arrived.get()
        return self.received


@pytest.fixture
async def notifications(nats_server) -> AsyncIterator[Notifications]:
    nc = await nats.connect(nats_server.url)
    seen = Notifications()
    try:
        await nc.subscribe("deploys.>", cb=seen.got)
        await nc.flush()
        yield seen
    finally:
        await nc.close()


# --- as CI calls the hook ---------------------------------------------------------------


def ci_payload(sha: str = SHA, version: str = "1.4.2") -> bytes:
    return json.dumps({"event": "deploy_requested", "service": "api", "version": version,
                       "commit": {"sha": sha, "message": "Speed up the search"},
                       "pipeline": {"id": 8812, "user": "dana", "url": "https://ci.example.com/p/8812"}}).encode()


def signature(secret: str, body: bytes, at: int | None = None) -> str:
    t = int(time.time()) if at is None else at
    digest = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={digest}"


def post_hook(server: ExampleServer, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(f"{server.url}/hooks/ci-deploy", data=body, method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def deliver(server: ExampleServer, body: bytes, delivery: str) -> dict[str, Any]:
    status, answer = post_hook(server, body, {"X-Baton-Signature": signature(SECRET, body),
                                              "X-Baton-Delivery": delivery})
    assert status == 202, answer
    return answer


def pending_approval(server: ExampleServer, run_id: str) -> dict[str, Any]:
    def listed() -> dict[str, Any] | None:
        approvals = server.ok("GET", f"/v1/approvals?run_id={run_id}")["approvals"]
        return approvals[0] if approvals else None
    return server.wait_for(listed, f"the approval request of {run_id}", WAIT_S)


def open_link(link: str, form: dict[str, str] | None = None) -> tuple[int, str]:
    """What a browser does: GET the page, or POST its form."""
    data = None if form is None else urllib.parse.urlencode(form).encode()
    req = urllib.request.Request(link, data=data, method="GET" if form is None else "POST",
                                 headers={"Accept": "text/html"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, resp.read().decode()


# --- the cases --------------------------------------------------------------------------


async def test_a_signed_ci_webhook_deploys_after_approval_through_the_link(server, standins, notifications):
    deploy = standins.states["deploy"]
    body = ci_payload()
    # not signed, or signed with another secret: refused, and no run
    assert post_hook(server, body, {"X-Baton-Delivery": "p-8812"})[0] == 401
    wrong = {"X-Baton-Signature": signature("not-the-secret", body), "X-Baton-Delivery": "p-8812"}
    assert post_hook(server, body, wrong)[0] == 401
    # another kind of pipeline event: accepted, and filtered out
    other = json.dumps({**json.loads(body), "event": "pipeline_finished"}).encode()
    assert (await off_loop(deliver, server, other, "p-8811"))["filtered"]
    assert server.runs(WORKFLOW) == []

    answer = await off_loop(deliver, server, body, "p-8812")
    (started,) = answer["runs"]
    run_id = started["run_id"]
    assert started["created"] and not answer["duplicate"]

    approval = await off_loop(pending_approval, server, run_id)
    assert approval["message"] == f"Deploy api 1.4.2 ({IMAGE}) to production? Requested by dana."
    # the build was asked about by its commit; nothing is deployed before the approval
    assert [c["path"] for c in deploy.calls] == [f"/deploy/ci/builds/{SHA}"]
    assert deploy.side_effects() == []

    # CI redelivers: the same run, no second one
    again = await off_loop(deliver, server, body, "p-8812")
    assert again["duplicate"] and again["runs"][0]["run_id"] == run_id
    assert [r["run_id"] for r in server.runs(WORKFLOW)] == [run_id]

    status, page = await off_loop(open_link, approval["link"])
    assert status == 200 and "Deploy api 1.4.2" in page and "Approve" in page
    assert server.run(run_id)["status"] == "running"  # opening the link decides nothing
    deploy.lost_answers = 1  # the release is made, but its answer is lost: the step retries
    status, page = await off_loop(open_link, approval["link"], {"decision": "approve", "comment": "go", "name": "alice"})
    assert status == 200

    run = await off_loop(server.wait_run, run_id, timeout_s=WAIT_S)
    assert run["status"] == "succeeded", run
    assert run["output"]["version"] == "1.4.2" and run["output"]["error_rate"] < 0.01
    steps = server.steps(run_id)
    assert {k: s["status"] for k, s in steps.items()} == {
        "build": "succeeded", "approve": "succeeded", "announce": "succeeded", "release": "succeeded",
        "traffic": "succeeded", "verify": "succeeded", "health": "succeeded", "error_rate": "succeeded",
        "notify": "succeeded"}
    decision = steps["approve"]["output"]
    assert (decision["decision"], decision["by"], decision["via"], decision["comment"]) == ("approve", "alice", "link", "go")

    # the deploy API got the release, then the traffic shift, each with its step's key
    assert deploy.side_effects() == [
        ("POST", "/deploy/releases", {"service": "api", "version": "1.4.2", "image": IMAGE}),
        ("PUT", "/deploy/traffic/api", {"weights": {"1.4.2": 100}}),
    ]
    # the retried release carried the same key, so it was answered, not made again
    assert [(c["path"], c["key"], c["repeat"]) for c in deploy.calls if c["method"] != "GET"] == [
        ("/deploy/releases", f"{run_id}:release", False), ("/deploy/releases", f"{run_id}:release", True),
        ("/deploy/traffic/api", f"{run_id}:traffic", False)]
    assert steps["release"]["attempt"] == 2
    assert deploy.services["api"].release == "1.4.2" and deploy.services["api"].weights == {"1.4.2": 100}
    checked = [c["path"] for c in deploy.calls if c["method"] == "GET"]
    assert "/deploy/health/api" in checked and "/deploy/prometheus/api/v1/query" in checked

    received = await notifications.wait_for("deploys.api.succeeded")
    assert [s for s, _ in received] == ["deploys.api.started", "deploys.api.succeeded"]
    assert received[0][1] == {"service": "api", "version": "1.4.2", "run_id": run_id, "approved_by": "alice"}


async def test_a_failing_health_check_restores_traffic_then_rolls_the_release_back(server, standins, notifications):
    deploy = standins.states["deploy"]
    deploy.unhealthy.add("api")  # the new release never becomes healthy
    # as the README's Quick start does it: no commit, so CI is asked for the build of the tag
    started = await off_loop(server.cli, "start", WORKFLOW, "--input", '{"service": "api", "version": "1.4.2"}', "--json")
    run_id = json.loads(started.stdout)["run_id"]
    await off_loop(pending_approval, server, run_id)
    listed = (await off_loop(server.cli, "approvals", "--json")).stdout
    assert run_id in listed and "Deploy api 1.4.2" in listed
    await off_loop(server.cli, "approve", run_id, "--comment", "go")

    run = await off_loop(server.wait_run, run_id, timeout_s=WAIT_S)
    assert run["status"] == "compensated", run
    assert deploy.calls[0]["path"] == "/deploy/ci/builds/1.4.2"
    image = f"registry.local/api@sha256:{hashlib.sha256(b'1.4.2').hexdigest()}"
    # undone in reverse order: traffic back to 1.4.1 first, then the release
    assert deploy.side_effects() == [
        ("POST", "/deploy/releases", {"service": "api", "version": "1.4.2", "image": image}),
        ("PUT", "/deploy/traffic/api", {"weights": {"1.4.2": 100}}),
        ("PUT", "/deploy/traffic/api", {"weights": {"1.4.1": 100}}),
        ("POST", "/deploy/releases/api/rollback", {"to": "1.4.1", "from": "1.4.2"}),
    ]
    assert [c["key"] for c in deploy.calls if c["method"] != "GET"][2:] == [
        f"{run_id}:traffic:compensate", f"{run_id}:release:compensate"]
    assert deploy.services["api"].release == "1.4.1" and deploy.services["api"].weights == {"1.4.1": 100}
    assert [c["path"] for c in deploy.calls].count("/deploy/health/api") == 3  # the step's retries, then it gave up

    steps = server.steps(run_id)
    assert steps["verify"]["status"] == "failed"
    for key in ("traffic", "release", "announce"):
        assert steps[key]["status"] == "succeeded" and steps[key]["compensation"]["status"] == "succeeded", steps[key]
    assert steps["build"]["compensation"] is None and "notify" not in steps
    history = server.ok("GET", f"/v1/runs/{run_id}/history?limit=500")["events"]
    undone = [e["key"] for e in history if e["type"] == "compensation.succeeded"]
    assert undone == ["traffic", "release", "announce"]  # the rollback notice goes out last

    received = await notifications.wait_for("deploys.api.rolled_back")
    assert [s for s, _ in received] == ["deploys.api.started", "deploys.api.rolled_back"]
    assert received[1][1]["run_id"] == run_id and received[1][1]["version"] == "1.4.2"


async def test_a_failed_build_deploys_nothing(server, standins, notifications):
    deploy = standins.states["deploy"]
    deploy.builds["0badc0ffee"] = "failed"
    run_id = (await off_loop(deliver, server, ci_payload(sha="0badc0ffee"), "p-8814"))["runs"][0]["run_id"]

    run = await off_loop(server.wait_run, run_id, timeout_s=WAIT_S)
    assert run["status"] == "failed", run
    steps = server.steps(run_id)
    assert set(steps) == {"build"}  # no approval asked, nothing announced
    assert steps["build"]["error"]["type"] == "BuildFailed" and steps["build"]["attempt"] == 1
    assert server.ok("GET", f"/v1/approvals?run_id={run_id}&status=all")["approvals"] == []
    assert deploy.side_effects() == [] and deploy.services["api"].release == "1.4.1"
    assert notifications.received == []


async def test_an_error_rate_over_the_threshold_rolls_back_at_once(server, standins, notifications):
    deploy = standins.states["deploy"]
    deploy.error_rates["api"] = 0.07  # 7% of the new release's requests fail; the workflow allows 1%
    run_id = (await off_loop(deliver, server, ci_payload(), "p-8815"))["runs"][0]["run_id"]
    await off_loop(pending_approval, server, run_id)
    server.ok("POST", f"/v1/runs/{run_id}/approval", {"decision": "approve", "comment": "go"})

    run = await off_loop(server.wait_run, run_id, timeout_s=WAIT_S)
    assert run["status"] == "compensated", run
    steps = server.steps(run_id)
    assert steps["error_rate"]["error"]["type"] == "ErrorRateTooHigh" and steps["error_rate"]["attempt"] == 1
    assert [(m, p) for m, p, _ in deploy.side_effects()][2:] == [
        ("PUT", "/deploy/traffic/api"), ("POST", "/deploy/releases/api/rollback")]
    assert deploy.services["api"].release == "1.4.1"
    received = await notifications.wait_for("deploys.api.rolled_back")
    assert [s for s, _ in received] == ["deploys.api.started", "deploys.api.rolled_back"]
