"""The audit log: real HTTP calls against the real runtime and SQLite, with auth on."""

from __future__ import annotations

import time

import orjson
import pytest
from typer.testing import CliRunner

from server.api.audit import _target
from server.api.auth import hash_token, new_token
from server.app import open_runtime
from server.cli import app as cli_app
from server.settings import ROLES, Settings
from tests.inproc import api_client
from tests.sample_workflows import APPROVAL, GREET
from tests.serverproc import ServerProcess

TOKENS = {role: new_token() for role in ROLES}
AUTH = {
    "enabled": True,
    "tokens": [{"name": f"{role}-bot", "sha256": hash_token(token), "roles": [role]} for role, token in TOKENS.items()],
}


def bearer(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[role]}"}


def write_workflows(tmp_path):
    wf = tmp_path / "wf"
    wf.mkdir(exist_ok=True)
    (wf / "greet.yaml").write_text(GREET)
    (wf / "approval.yaml").write_text(APPROVAL)
    return wf


def settings_for(tmp_path, **extra) -> Settings:
    return Settings(data_dir=tmp_path / "data", workflows=[write_workflows(tmp_path)], handler_modules=[],
                    auth=AUTH, nats={"enabled": False}, **extra)


@pytest.fixture
async def api(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # keep the repository's config/baton.yaml out of it
    settings = settings_for(tmp_path)
    async with api_client(settings) as client:
        yield client


async def call(client, method: str, path: str, expect: int, role: str | None = "admin", **kwargs):
    headers = {**(bearer(role) if role else {}), **kwargs.pop("headers", {})}
    response = await client.request(method, path, headers=headers, **kwargs)
    body = await response.json()
    assert response.status == expect, body
    return body, response


async def entries(client, query: str = "") -> list[dict]:
    """Every API entry (not the definition.loaded ones of start-up), newest first."""
    body, _ = await call(client, "GET", f"/v1/audit?limit=500{query}", 200)
    return [e for e in body["entries"] if e["actor"] != "system"]


async def wait_for_gate(client, run_id: str) -> None:
    for _ in range(200):
        run, _ = await call(client, "GET", f"/v1/runs/{run_id}", 200, role="viewer")
        if "approve" in run["waiting_for"]:
            return
        await call(client, "GET", f"/v1/runs/{run_id}/wait?timeout=0.02", 200, role="viewer")
    raise AssertionError(f"run {run_id} never waited for approve")


async def test_mutating_calls_record_who_what_target_where_and_outcome(api):
    run, response = await call(api, "POST", "/v1/workflows/approval/runs", 201, role="operator",
                               json={"input": None, "workflow_id": "deploy-1"})
    start_request_id = response.headers["X-Request-Id"]
    await wait_for_gate(api, run["run_id"])
    await call(api, "POST", f"/v1/runs/{run['run_id']}/signals/approve", 202, role="operator", json={"data": 1})
    other, _ = await call(api, "POST", "/v1/workflows/approval/runs", 201, role="admin", json={"input": None})
    await call(api, "POST", f"/v1/runs/{other['run_id']}/cancel", 202, role="admin", json={"reason": "test"})

    cancel, second, signal, start = await entries(api)
    assert start["actor"] == "operator-bot" and start["action"] == "start_run"
    assert start["target"] == "workflow:approval" and start["status"] == 201
    assert start["remote"] == "127.0.0.1" and start["request_id"] == start_request_id
    assert start["detail"] == {"method": "POST", "path": "/v1/workflows/approval/runs", "run_id": run["run_id"]}
    assert signal["action"] == "signal" and signal["status"] == 202 and signal["actor"] == "operator-bot"
    assert signal["target"] == f"run:{run['run_id']}" and signal["detail"]["signal"] == "approve"
    assert second["detail"]["run_id"] == other["run_id"] and second["actor"] == "admin-bot"
    assert cancel["action"] == "cancel" and cancel["target"] == f"run:{other['run_id']}"
    assert cancel["status"] == 202 and cancel["actor"] == "admin-bot"
    assert "run_id" not in cancel["detail"]  # the target names it already
    ids = [e["id"] for e in (cancel, second, signal, start)]
    assert ids == sorted(ids, reverse=True)
    for entry in (cancel, second, signal, start):
        assert entry["at"].endswith("Z") and entry["request_id"]


async def test_refusals_and_failures_are_recorded_reads_are_not(api):
    await call(api, "POST", "/v1/workflows/greet/runs", 403, role="viewer", json={"input": {"name": "x"}})
    await call(api, "POST", "/v1/workflows/greet/runs", 401, role=None, json={"input": {"name": "x"}})
    await call(api, "POST", "/v1/runs/nope/cancel", 401, role=None,
               headers={"Authorization": f"Bearer {new_token()}"}, json={})
    await call(api, "POST", "/v1/runs/nope/cancel", 404, role="operator", json={})
    await call(api, "POST", "/v1/workflows/greet/runs", 422, role="operator", json={"input": {}})
    # reads, and paths no route serves, are not audit events
    await call(api, "GET", "/v1/runs", 200, role="viewer")
    await call(api, "GET", "/v1/workflows/greet", 200, role="viewer")
    await call(api, "POST", "/v1/no-such-thing", 404, role="operator", json={})
    await call(api, "GET", "/v1/runs", 401, role=None)

    invalid, missing, forged, anonymous, forbidden = await entries(api)
    assert (forbidden["actor"], forbidden["status"], forbidden["detail"]["error"]) == ("viewer-bot", 403, "forbidden")
    assert "operator role" in forbidden["detail"]["message"]
    assert (anonymous["actor"], anonymous["status"], anonymous["action"]) == ("unauthenticated", 401, "start_run")
    assert (forged["actor"], forged["status"], forged["target"]) == ("unauthenticated", 401, "run:nope")
    assert (missing["actor"], missing["status"], missing["detail"]["error"]) == ("operator-bot", 404, "run_not_found")
    assert (invalid["status"], invalid["detail"]["error"]) == (422, "invalid_input")
    assert all(e["remote"] == "127.0.0.1" for e in (invalid, missing, forged, anonymous, forbidden))


async def test_link_tokens_never_reach_the_audit_log(api):
    secret = "s3cr3t-link-token-" + new_token()
    response = await api.post(f"/v1/approvals/{secret}", json={"decision": "approve"})
    assert response.status == 401, await response.text()  # no such approval: refused, and recorded
    (entry,) = await entries(api)
    assert entry["status"] == 401
    assert entry["target"] == "approval:[redacted]" and entry["detail"]["path"] == "/v1/approvals/[redacted]"
    assert secret not in orjson.dumps(entry).decode()


async def test_pages_with_a_cursor_and_filters(api):
    before = time.time()
    for i in range(5):
        await call(api, "POST", f"/v1/runs/r{i}/cancel", 404, role="operator", json={})
    await call(api, "POST", "/v1/workflows/greet/runs", 403, role="viewer", json={"input": {"name": "x"}})
    everything = await entries(api)
    assert len(everything) == 6

    seen, cursor = [], None
    while True:
        page, _ = await call(api, "GET", "/v1/audit?limit=2" + (f"&cursor={cursor}" if cursor else ""), 200)
        assert len(page["entries"]) <= 2
        seen += page["entries"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [e for e in seen if e["actor"] != "system"] == everything  # every entry once, in order

    by_actor, _ = await call(api, "GET", "/v1/audit?actor=viewer-bot", 200)
    assert [e["status"] for e in by_actor["entries"]] == [403]
    cancels, _ = await call(api, "GET", "/v1/audit?action=cancel&limit=3", 200)
    assert [e["target"] for e in cancels["entries"]] == ["run:r4", "run:r3", "run:r2"]
    assert cancels["next_cursor"] is not None
    later, _ = await call(api, "GET", f"/v1/audit?since={time.time() + 60}", 200)
    assert later["entries"] == []
    window, _ = await call(api, "GET", f"/v1/audit?since={before}&until={time.time() + 1}", 200)
    assert [e for e in window["entries"] if e["actor"] != "system"] == everything
    _, response = await call(api, "GET", "/v1/audit?cursor=abc", 400)
    body, _ = await call(api, "GET", "/v1/audit?since=yesterday", 400)
    assert body["error"]["field"] == "since"


async def test_only_admins_read_the_audit_log(api):
    for role in ("viewer", "operator", "approver"):
        body, _ = await call(api, "GET", "/v1/audit", 403, role=role)
        assert "admin role" in body["error"]["message"]
    await call(api, "GET", "/v1/audit", 401, role=None)
    await call(api, "GET", "/v1/audit", 200, role="admin")


async def test_forwarded_for_is_ignored_unless_proxies_are_trusted(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    headers = {"X-Forwarded-For": "203.0.113.9, 198.51.100.7"}
    for trusted, remote in ((0, "127.0.0.1"), (1, "198.51.100.7"), (2, "203.0.113.9"), (3, "127.0.0.1")):
        settings = settings_for(tmp_path, audit={"trusted_proxies": trusted})
        async with api_client(settings) as client:
            await call(client, "POST", "/v1/runs/r1/cancel", 404, role="operator", json={}, headers=headers)
            latest = (await entries(client))[0]
        assert latest["remote"] == remote, trusted
        assert latest["detail"].get("peer") == (None if remote == "127.0.0.1" else "127.0.0.1")


async def test_definitions_are_recorded_once_when_first_loaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = settings_for(tmp_path)

    async def loaded() -> list[dict]:
        async with open_runtime(settings) as runtime:
            page, _ = await runtime.list_audit(action="definition.loaded", limit=100)
            return page

    first = await loaded()
    assert sorted(e["target"] for e in first) == ["workflow:approval", "workflow:greet"]
    greet = next(e for e in first if e["target"] == "workflow:greet")
    assert greet["actor"] == "system" and greet["status"] is None and greet["remote"] is None
    assert greet["detail"]["version"] == "2" and greet["detail"]["file"].endswith("greet.yaml")
    assert len(greet["detail"]["def_hash"]) == 64

    assert await loaded() == first  # a restart with the same files adds nothing

    (tmp_path / "wf" / "greet.yaml").write_text(GREET.replace("two echoes in a row", "edited in place"))
    after_edit = await loaded()
    assert len(after_edit) == 3
    edited = after_edit[0]  # newest first
    assert edited["target"] == "workflow:greet" and edited["detail"]["version"] == "2"
    assert edited["detail"]["def_hash"] != greet["detail"]["def_hash"]


def test_target_names_the_resource_and_never_a_credential():
    assert _target("/v1/workflows/{name}/runs", {"name": "greet"}) == ("workflow:greet", {})
    assert _target("/v1/runs/{run_id}/signals/{name}", {"run_id": "r1", "name": "go"}) == ("run:r1", {"signal": "go"})
    assert _target("/v1/dead-letters/{id}/replay", {"id": "7"}) == ("dead-letter:7", {})
    assert _target("/hooks/{path}", {"path": "deploy"}) == ("hook:deploy", {})
    assert _target("/approvals/{token:[^/]+}/approve", {"token": "s3cr3t"}) == ("approval:[redacted]", {})
    assert _target("/v1/things", {}) == (None, {})


def test_baton_audit_lists_entries_from_a_real_server(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BATON_CONFIG", raising=False)
    tokens = '[{"name": "root", "sha256": "%s", "roles": ["admin"]}]' % hash_token(TOKENS["admin"])
    server = ServerProcess(tmp_path / "data", write_workflows(tmp_path), BATON_AUTH__ENABLED="true",
                           BATON_AUTH__TOKENS=tokens, BATON_NATS__ENABLED="false")
    server.start()
    try:
        runner = CliRunner()
        env = {"BATON_TOKEN": TOKENS["admin"]}
        started = runner.invoke(cli_app, ["start", "greet", "--input", '{"name": "ada"}', "--url", server.url], env=env)
        assert started.exit_code == 0, started.output
        result = runner.invoke(cli_app, ["audit", "--url", server.url, "--actor", "root", "--json"], env=env)
        assert result.exit_code == 0, result.output
        (entry,) = orjson.loads(result.stdout)["entries"]
        assert (entry["action"], entry["target"], entry["status"]) == ("start_run", "workflow:greet", 201)
        table = runner.invoke(cli_app, ["audit", "--url", server.url], env=env)
        assert table.exit_code == 0, table.output
        assert "start_run" in table.stdout and "definition.loaded" in table.stdout
        refused = runner.invoke(cli_app, ["audit", "--url", server.url], env={"BATON_TOKEN": ""})
        assert refused.exit_code == 1 and "admin role" in refused.stderr
    finally:
        server.stop()
