"""Approval steps end to end: real HTTP (aiohttp on loopback), real SQLite, real nats-server.

The link's page and its decision, single use (409), expiry (410), tampering (401),
rejection with compensation, approvers on the API route with auth on, timeouts,
the chat webhook, the NATS event, a decision after a restart, and the CLI.
"""

from __future__ import annotations

import asyncio
import re
import stat
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import nats
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from typer.testing import CliRunner

from server.api.auth import hash_token, new_token
from server.cli import app as cli_app
from server.runtime.approvals import ApprovalLinks
from server.runtime.clock import SystemClock
from server.settings import Settings
from tests.inproc import api_client, call, runtime_of
from tests.serverproc import ServerProcess

PUBLIC_URL = "https://baton.example.test"
BOUND_S = 10.0  # every wait below is for a condition, bounded by this

RELEASE = """\
name: release
version: 3
steps:
  - id: build
    task: echo
    input: {image: "app:{{ input.version }}"}
    compensate: {task: echo, input: {undo: "{{ steps.build.output.image }}"}}
  - id: gate
    wait_for_signal:
      approval:
        message: "Ship {{ input.version }}? {{ input.note | default('') }}"
        approvers: [alice]
  - id: ship
    task: echo
    input: {decision: "{{ steps.gate.output.decision }}", by: "{{ steps.gate.output.by }}"}
"""


def timed(name: str, on_timeout: str) -> str:
    return f"""\
name: {name}
steps:
  - id: build
    task: echo
    input: {{built: true}}
    compensate: {{task: echo}}
  - id: gate
    wait_for_signal: {{approval: {{timeout: 0.3s, on_timeout: {on_timeout}}}}}
  - id: after
    task: echo
    input: "{{{{ steps.gate.output }}}}"
"""


TWO_GATES = """\
name: two-gates
steps:
  - id: both
    parallel:
      a: [{id: qa, wait_for_signal: {approval: {message: QA ok?}}}]
      b: [{id: sec, wait_for_signal: {approval: {message: security ok?}}}]
"""


class ShiftedClock(SystemClock):
    """The system clock, moved forward on demand: link expiry without waiting for it."""

    def __init__(self) -> None:
        super().__init__(seed=7)
        self.shift_s = 0.0

    def now(self) -> float:
        return time.time() + self.shift_s


def make_settings(tmp_path, **overrides: Any) -> Settings:
    wf = tmp_path / "wf"
    wf.mkdir(exist_ok=True)
    (wf / "release.yaml").write_text(RELEASE)
    (wf / "timed-reject.yaml").write_text(timed("timed-reject", "reject"))
    (wf / "timed-approve.yaml").write_text(timed("timed-approve", "approve"))
    (wf / "two-gates.yaml").write_text(TWO_GATES)
    base: dict[str, Any] = dict(data_dir=tmp_path / "data", workflows=[wf], handler_modules=[], public_url=PUBLIC_URL,
                                auth={"enabled": False}, nats={"enabled": False}, limits={"shutdown_grace_s": 0.5})
    return Settings(**{**base, **overrides})


@asynccontextmanager
async def serving(settings: Settings, clock: SystemClock | None = None) -> AsyncIterator[tuple[TestClient, Any]]:
    async with api_client(settings, clock) as client:
        yield client, runtime_of(client)


@pytest.fixture
def settings(tmp_path, monkeypatch) -> Settings:
    monkeypatch.chdir(tmp_path)  # keep the repository's config/baton.yaml out of it
    return make_settings(tmp_path)


@pytest.fixture
async def api(settings) -> AsyncIterator[TestClient]:
    async with serving(settings) as (client, _):
        yield client


async def start(client: TestClient, workflow: str = "release", input: Any = None, **kwargs: Any) -> str:  # noqa: A002
    run = await call(client, "POST", f"/v1/workflows/{workflow}/runs", 201, json={"input": input or {"version": "1.2"}},
                     **kwargs)
    return run["run_id"]


async def pending(client: TestClient, run_id: str, count: int = 1, **kwargs: Any) -> list[dict[str, Any]]:
    """The run's pending approvals, once there are `count` (the run is a few echoes away from its gate)."""
    deadline = time.monotonic() + BOUND_S
    while time.monotonic() < deadline:
        page = await call(client, "GET", f"/v1/approvals?run_id={run_id}", 200, **kwargs)
        if len(page["approvals"]) >= count:
            return page["approvals"]
        await client.get(f"/v1/runs/{run_id}/wait?timeout=0.02", **kwargs)
    raise AssertionError(f"run {run_id} never asked for {count} approval(s)")


def path_of(link: str) -> str:
    assert link.startswith(f"{PUBLIC_URL}/v1/approvals/"), link
    return link[len(PUBLIC_URL):]


async def finished(client: TestClient, run_id: str, **kwargs: Any) -> dict[str, Any]:
    return await call(client, "GET", f"/v1/runs/{run_id}/wait?timeout={BOUND_S}", 200, **kwargs)


async def history(client: TestClient, run_id: str, **kwargs: Any) -> list[dict[str, Any]]:
    return (await call(client, "GET", f"/v1/runs/{run_id}/history", 200, **kwargs))["events"]


def decided_event(events: list[dict[str, Any]]) -> dict[str, Any]:
    (event,) = [e for e in events if e["type"] == "approval.decided"]
    return event


# --- the link ---------------------------------------------------------------------------------


async def test_the_page_shows_the_request_and_approving_resumes_the_run(api):
    run_id = await start(api, input={"version": "1.2"})
    (approval,) = await pending(api, run_id)
    assert approval["status"] == "pending" and approval["key"] == "gate" and approval["id"] == f"{run_id}:gate:1"
    detail = await call(api, "GET", f"/v1/runs/{run_id}", 200)
    assert detail["waiting_for"] == ["approval:gate"]
    link = path_of(approval["link"])

    page = await api.get(link)
    html = await page.text()
    assert page.status == 200 and page.content_type == "text/html"
    for text in ("release@3", run_id, "gate", "Ship 1.2?", "anonymous", "alice"):
        assert text in html, text
    assert 'value="approve"' in html and 'value="reject"' in html and "<form method=\"post\">" in html
    assert "script-src" not in page.headers["Content-Security-Policy"]  # default-src 'none': no script at all
    assert page.headers["Referrer-Policy"] == "no-referrer"
    as_json = await call(api, "GET", link, 200, headers={"Accept": "application/json"})
    assert as_json["run_id"] == run_id and as_json["message"] == "Ship 1.2? "

    decided = await call(api, "POST", link, 200, json={"decision": "approve", "comment": "go", "name": "Dana"})
    assert decided["approval"]["status"] == "approved" and decided["approval"]["decided_by"] == "Dana"
    assert decided["approval"]["decided_via"] == "link" and decided["approval"]["comment"] == "go"
    done = await finished(api, run_id)
    assert done["status"] == "succeeded"
    steps = {s["key"]: s for s in (await call(api, "GET", f"/v1/runs/{run_id}", 200))["steps"]}
    assert steps["gate"]["output"]["decision"] == "approve" and steps["gate"]["output"]["by"] == "Dana"
    assert steps["ship"]["output"] == {"decision": "approve", "by": "Dana"}

    again = await call(api, "POST", link, 409, json={"decision": "reject"})
    assert again["error"]["code"] == "conflict" and "already approved by Dana" in again["error"]["message"]
    shown = await (await api.get(link)).text()
    assert "approved by Dana" in shown and "not verified" in shown and 'value="approve"' not in shown
    event = decided_event(await history(api, run_id))
    assert event["data"]["by"] == {"name": "Dana", "via": "link"} and event["data"]["comment"] == "go"
    assert (await call(api, "GET", f"/v1/approvals?run_id={run_id}", 200))["approvals"] == []


async def test_an_expired_link_is_410_but_an_approver_may_still_decide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    clock = ShiftedClock()
    async with serving(make_settings(tmp_path, approvals={"link_ttl_s": 3600}), clock) as (api, _):
        run_id = await start(api)
        (approval,) = await pending(api, run_id)
        link = path_of(approval["link"])
        assert (await api.get(link)).status == 200
        clock.shift_s = 3601
        page = await api.get(link)
        assert page.status == 410 and "expired" in await page.text()
        body = await call(api, "POST", link, 410, json={"decision": "approve"})
        assert body["error"]["code"] == "gone"
        # the request itself has no deadline: the approver's route still decides it
        await call(api, "POST", f"/v1/runs/{run_id}/approval", 200, json={"decision": "approve"})
        assert (await finished(api, run_id))["status"] == "succeeded"


async def test_a_tampered_or_foreign_link_is_401_and_decides_nothing(api):
    run_id = await start(api)
    (approval,) = await pending(api, run_id)
    token = approval["link"].rsplit("/", 1)[1]
    payload, _, signature = token.partition(".")
    # a character in the middle: the last one also holds padding bits that decoding drops
    flipped = f"{payload}.{signature[:10]}{'A' if signature[10] != 'A' else 'B'}{signature[11:]}"
    foreign = ApprovalLinks("another key", PUBLIC_URL, 3600).token(approval["id"], time.time() + 3600)
    for bad in (flipped, "nonsense", foreign, payload + ".", token.replace(payload, payload[::-1])):
        body = await call(api, "POST", f"/v1/approvals/{bad}", 401, json={"decision": "approve"})
        assert body["error"]["code"] == "unauthorized"
        page = await api.get(f"/v1/approvals/{bad}")
        assert page.status == 401 and "not valid" in await page.text()
    # status=all, so a request that was decided would show up too, and not as pending
    (still,) = (await call(api, "GET", f"/v1/approvals?run_id={run_id}&status=all", 200))["approvals"]
    assert still["status"] == "pending"


async def test_a_rejection_by_form_compensates_and_history_says_who_and_why(api):
    run_id = await start(api)
    (approval,) = await pending(api, run_id)
    link = path_of(approval["link"])
    answer = await api.post(link, data={"decision": "reject", "comment": "not on a Friday", "name": "bob"})
    html = await answer.text()
    assert answer.status == 200 and answer.content_type == "text/html"
    assert "Rejected" in html and "not on a Friday" in html
    assert (await finished(api, run_id))["status"] == "compensated"
    detail = await call(api, "GET", f"/v1/runs/{run_id}", 200)
    steps = {s["key"]: s for s in detail["steps"]}
    assert steps["build"]["compensation"]["status"] == "succeeded"
    assert steps["gate"]["error"]["type"] == "ApprovalRejected" and "ship" not in steps
    events = await history(api, run_id)
    event = decided_event(events)
    assert event["data"]["decision"] == "reject" and event["data"]["comment"] == "not on a Friday"
    assert event["data"]["by"] == {"name": "bob", "via": "link"}
    types = [e["type"] for e in events]
    assert types.index("approval.decided") < types.index("compensation.succeeded")
    # the form's own errors come back as a page too
    again = await api.post(link, data={"decision": "approve"})
    assert again.status == 409 and "Already decided" in await again.text()
    bad = await api.post(link, data={"decision": "maybe"})
    assert bad.status == 422 and "decision" in await bad.text()


async def test_the_message_is_escaped_on_the_page(api):
    run_id = await start(api, input={"version": "2", "note": '<script>alert("x")</script><b onmouseover=1>'})
    (approval,) = await pending(api, run_id)
    html = await (await api.get(path_of(approval["link"]))).text()
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&lt;b onmouseover=1&gt;" in html
    assert "<script" not in html and "<b onmouseover" not in html


async def test_a_plain_signal_cannot_decide_an_approval(api):
    run_id = await start(api)
    await pending(api, run_id)
    for name in ("gate", "approve"):
        body = await call(api, "POST", f"/v1/runs/{run_id}/signals/{name}", 409, json={"data": {"ok": True}})
        assert "waiting for: none" in body["error"]["message"]
    # status=all, so a request that was decided would show up too, and not as pending
    (still,) = (await call(api, "GET", f"/v1/approvals?run_id={run_id}&status=all", 200))["approvals"]
    assert still["status"] == "pending"


async def test_several_pending_approvals_need_a_step_on_the_api_route(api):
    run_id = await start(api, "two-gates")
    approvals = await pending(api, run_id, count=2)
    assert {a["message"] for a in approvals} == {"QA ok?", "security ok?"}
    body = await call(api, "POST", f"/v1/runs/{run_id}/approval", 400, json={"decision": "approve"})
    assert body["error"]["field"] == "step" and "qa" in body["error"]["message"]
    await call(api, "POST", f"/v1/runs/{run_id}/approval", 200, json={"decision": "approve", "step": "qa"})
    await call(api, "POST", f"/v1/runs/{run_id}/approval", 409, json={"decision": "approve", "step": "qa"})
    await call(api, "POST", f"/v1/runs/{run_id}/approval", 200, json={"decision": "approve"})
    assert (await finished(api, run_id))["status"] == "succeeded"
    await call(api, "POST", f"/v1/runs/{run_id}/approval", 409, json={"decision": "approve"})
    await call(api, "POST", "/v1/runs/nope/approval", 404, json={"decision": "approve"})


# --- approvers on the API route -------------------------------------------------------------

TOKENS = {name: new_token() for name in ("alice", "bob", "ops", "root", "watcher")}
ROLES = {"alice": "approver", "bob": "approver", "ops": "operator", "root": "admin", "watcher": "viewer"}


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[name]}"}


async def test_approvers_apply_to_the_api_route_with_auth_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    auth = {"enabled": True, "tokens": [{"name": n, "sha256": hash_token(t), "roles": [ROLES[n]]}
                                        for n, t in TOKENS.items()]}
    async with serving(make_settings(tmp_path, auth=auth)) as (api, _):
        run_id = await start(api, headers=bearer("ops"))
        (seen,) = await pending(api, run_id, headers=bearer("watcher"))
        assert seen["link"] is None  # a viewer sees the request, not the credential that decides it
        (approval,) = await pending(api, run_id, headers=bearer("bob"))
        assert approval["link"] and approval["started_by"] == "ops"

        route = f"/v1/runs/{run_id}/approval"
        body = await call(api, "POST", route, 403, json={"decision": "approve"}, headers=bearer("bob"))
        assert "alice" in body["error"]["message"] and "'bob'" in body["error"]["message"]
        body = await call(api, "POST", route, 403, json={"decision": "approve"}, headers=bearer("ops"))
        assert "approver role" in body["error"]["message"]
        await call(api, "POST", route, 401, json={"decision": "approve"})
        decided = await call(api, "POST", route, 200, json={"decision": "approve", "comment": "lgtm"},
                             headers=bearer("alice"))
        assert decided["approval"]["decided_by"] == "alice" and decided["approval"]["decided_via"] == "token"
        assert decided["run"]["run_id"] == run_id
        assert (await finished(api, run_id, headers=bearer("watcher")))["status"] == "succeeded"
        event = decided_event(await history(api, run_id, headers=bearer("watcher")))
        assert event["data"]["by"] == {"name": "alice", "via": "token"}

        # admin always may; a token sent with a link names who decided, and the link stays open
        other = await start(api, headers=bearer("ops"))
        await call(api, "POST", f"/v1/runs/{other}/approval", 200, json={"decision": "reject"}, headers=bearer("root"))
        third = await start(api, headers=bearer("ops"))
        (approval,) = await pending(api, third, headers=bearer("alice"))
        decided = await call(api, "POST", path_of(approval["link"]), 200, json={"decision": "approve"},
                             headers=bearer("bob"))
        assert decided["approval"]["decided_by"] == "bob" and decided["approval"]["decided_via"] == "token"


# --- timeouts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("workflow, status, decision", [("timed-reject", "compensated", "reject"),
                                                         ("timed-approve", "succeeded", "approve")])
async def test_the_timeout_decides_per_on_timeout(api, workflow, status, decision):
    run_id = await start(api, workflow)
    assert (await finished(api, run_id))["status"] == status  # after the 0.3 s approval timeout
    detail = await call(api, "GET", f"/v1/runs/{run_id}", 200)
    gate = next(s for s in detail["steps"] if s["key"] == "gate")
    output = gate["output"] if decision == "approve" else gate["error"]["details"]
    assert output["decision"] == decision and output["via"] == "timeout"
    page = await call(api, "GET", f"/v1/approvals?run_id={run_id}&status=all", 200)
    (approval,) = page["approvals"]
    assert approval["status"] == "expired" and approval["decided_via"] == "timeout" and approval["link"] is None
    types = [e["type"] for e in await history(api, run_id)]
    assert "approval.timed_out" in types


# --- notifications -----------------------------------------------------------------------------


async def test_the_notify_url_receives_the_link(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    calls = {"n": 0}

    async def hook(request: web.Request) -> web.Response:
        calls["n"] += 1
        if calls["n"] == 1:
            return web.Response(status=503)  # a hiccup: the notifier tries again
        received.put_nowait(await request.json())
        return web.Response(text="ok")

    receiver = web.Application()
    receiver.router.add_post("/hook", hook)
    async with TestServer(receiver, host="127.0.0.1") as hook_server:
        url = str(hook_server.make_url("/hook"))
        settings = make_settings(tmp_path, approvals={"notify_url": url})
        async with serving(settings) as (api, _):
            run_id = await start(api, input={"version": "3.1", "note": "<@channel> & co"})
            message = await asyncio.wait_for(received.get(), BOUND_S)
            text = message["text"]
            assert "Ship 3.1? &lt;@channel&gt; &amp; co" in text and run_id in text and "release@3" in text
            link = re.search(r"https://\S+", text).group(0)
            await call(api, "POST", path_of(link), 200, json={"decision": "approve"})
            assert (await finished(api, run_id))["status"] == "succeeded"
    assert calls["n"] == 2


async def test_nats_gets_a_cloudevent_with_the_link(tmp_path, monkeypatch, nats_server):
    monkeypatch.chdir(tmp_path)
    settings = make_settings(tmp_path, nats={"enabled": True}, nats_url=nats_server.url)
    nc = await nats.connect(nats_server.url)
    try:
        messages: asyncio.Queue = asyncio.Queue()
        await nc.subscribe("baton.approval.>", cb=messages.put)
        async with serving(settings) as (api, _):
            run_id = await start(api)
            msg = await asyncio.wait_for(messages.get(), BOUND_S)
            assert msg.subject == "baton.approval.requested"
            event = orjson.loads(msg.data)
            assert event["type"] == "baton.approval.requested" and event["source"] == "baton"
            assert event["id"] == f"{run_id}:gate:1:requested" and event["subject"] == run_id
            data = event["data"]
            assert data["run_id"] == run_id and data["workflow"] == "release" and data["message"] == "Ship 1.2? "
            assert msg.headers["Baton-Run-Id"] == run_id and msg.headers["Nats-Msg-Id"] == event["id"]
            await call(api, "POST", path_of(data["link"]), 200, json={"decision": "approve", "name": "eve"})
            closed = await asyncio.wait_for(messages.get(), BOUND_S)
            assert closed.subject == "baton.approval.approved"
            assert orjson.loads(closed.data)["data"]["decided_by"] == "eve"
    finally:
        await nc.close()


# --- durability ------------------------------------------------------------------------------


async def test_a_link_decides_after_a_restart(settings):
    async with serving(settings) as (api, _):
        run_id = await start(api)
        (approval,) = await pending(api, run_id)
    key_file = settings.data_dir / "approval.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    async with serving(settings) as (api, _):  # a new process would read the same key file
        link = path_of(approval["link"])
        assert (await api.get(link)).status == 200
        await call(api, "POST", link, 200, json={"decision": "approve"})
        assert (await finished(api, run_id))["status"] == "succeeded"
        await call(api, "POST", link, 409, json={"decision": "approve"})


async def test_cancelling_the_run_closes_its_request(api):
    run_id = await start(api)
    (approval,) = await pending(api, run_id)
    await call(api, "POST", f"/v1/runs/{run_id}/cancel", 202, json={})
    assert (await finished(api, run_id))["status"] == "cancelled"
    body = await call(api, "POST", path_of(approval["link"]), 409, json={"decision": "approve"})
    assert "cancelled" in body["error"]["message"]


# --- the command line ------------------------------------------------------------------------


@pytest.mark.integration
def test_cli_lists_pending_approvals_and_decides_them(tmp_path):
    settings = make_settings(tmp_path)
    server = ServerProcess(tmp_path / "data", settings.workflows[0], BATON_NATS__ENABLED="false",
                           BATON_PUBLIC_URL=PUBLIC_URL)
    server.start(timeout_s=30)
    runner = CliRunner()
    try:
        status, run = server.request("POST", "/v1/workflows/release/runs", {"input": {"version": "9"}})
        assert status == 201, run
        run_id = run["run_id"]
        server.wait_for(lambda: server.request("GET", f"/v1/approvals?run_id={run_id}")[1]["approvals"],
                        "the approval request")
        (approval,) = server.request("GET", f"/v1/approvals?run_id={run_id}")[1]["approvals"]
        listed = runner.invoke(cli_app, ["approvals", "--url", server.url], terminal_width=80)
        assert listed.exit_code == 0, listed.output
        assert run_id in listed.stdout and "Ship 9?" in listed.stdout
        # the whole link, on a line of its own, whatever the terminal's width
        assert f"link {run_id} gate: {approval['link']}" in listed.stdout.splitlines()
        assert approval["link"].startswith(f"{PUBLIC_URL}/v1/approvals/")
        decided = runner.invoke(cli_app, ["approve", run_id, "--reject", "--comment", "not yet", "--url", server.url])
        assert decided.exit_code == 0, decided.output
        assert f"step gate of run {run_id} rejected by anonymous" in decided.stdout
        server.wait_for(lambda: server.request("GET", f"/v1/runs/{run_id}")[1]["status"] == "compensated",
                        "the run to be compensated")
        again = runner.invoke(cli_app, ["approve", run_id, "--url", server.url])
        assert again.exit_code == 1 and "no approval of run" in again.stderr
    finally:
        server.stop()


# --- the store and the key ---------------------------------------------------------------------


async def test_the_store_closes_a_request_once_and_pages_newest_first(tmp_path):
    from server.errors import BadRequest
    from server.store.base import ApprovalClosed, ApprovalRow, Batch
    from server.store.sqlite import SQLiteStore

    store = SQLiteStore(tmp_path / "db.sqlite")
    await store.open()
    try:
        rows = [ApprovalRow(f"r{i}:gate:1", f"r{i}", "gate", "gate", "pending", 100.0 + i, None, data=b"{}")
                for i in range(3)]
        await store.commit(Batch(approvals=rows))
        await store.commit(Batch(approvals=[ApprovalRow("r0:gate:1", "r0", "gate", "gate", "pending", 1.0, None)]))
        assert (await store.get_approval("r0:gate:1")).requested_at == 100.0  # an existing request is kept
        await store.commit(Batch(approvals_closed=[ApprovalClosed("r1:gate:1", "approved", 200.0, "alice", "token")]))
        await store.commit(Batch(approvals_closed=[ApprovalClosed("r1:gate:1", "rejected", 201.0, "bob", "link")]))
        closed = await store.get_approval("r1:gate:1")
        assert (closed.status, closed.decided_by, closed.decided_at) == ("approved", "alice", 200.0)
        page, cursor = await store.list_approvals(status="pending", limit=1)
        assert [r.id for r in page] == ["r2:gate:1"] and cursor
        page, cursor = await store.list_approvals(status="pending", limit=1, cursor=cursor)
        assert [r.id for r in page] == ["r0:gate:1"] and cursor is None
        assert [r.id for r in (await store.list_approvals(run_id="r1"))[0]] == ["r1:gate:1"]
        with pytest.raises(BadRequest):
            await store.list_approvals(cursor="not-ours")
    finally:
        await store.close()


def test_a_configured_secret_wins_and_an_empty_key_file_is_an_error(tmp_path):
    from server.errors import ConfigError
    from server.runtime.approvals import load_secret

    assert load_secret("from-config", tmp_path) == "from-config"
    assert not (tmp_path / "approval.key").exists()
    made = load_secret(None, tmp_path)
    assert load_secret(None, tmp_path) == made and len(made) >= 32
    (tmp_path / "approval.key").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        load_secret(None, tmp_path)
