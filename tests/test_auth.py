"""API authentication and roles, through real HTTP against the real runtime.

The role matrix is driven by the route table itself: every route any module adds is
called with no token, a wrong token, and a token of each role, so a new endpoint
cannot ship without the check its declared role promises.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from server.api.auth import GRANTS, hash_token, new_token
from server.api.routes import all_routes
from server.cli import app as cli_app
from server.settings import ROLES, Settings
from tests.inproc import api_client
from tests.sample_workflows import APPROVAL, GREET
from tests.serverproc import REPO, ServerProcess

TOKENS = {role: new_token() for role in ROLES}
AUTH = {
    "enabled": True,
    "tokens": [{"name": f"{role}-bot", "sha256": hash_token(token), "roles": [role]} for role, token in TOKENS.items()],
}


@pytest.fixture
async def api(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wf = tmp_path / "wf"
    wf.mkdir()
    (wf / "greet.yaml").write_text(GREET)
    (wf / "approval.yaml").write_text(APPROVAL)
    settings = Settings(data_dir=tmp_path / "data", workflows=[wf], handler_modules=[], auth=AUTH,
                        nats={"enabled": False})
    async with api_client(settings) as client:
        yield client


def bearer(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[role]}"}


def concrete(path: str) -> str:
    """A path template with placeholder values: enough to reach the auth check."""
    return re.sub(r"\{(\w+)[^}]*\}", lambda m: "1" if m.group(1) == "id" else "nope", path)


PROTECTED = [r for r in all_routes() if r.role is not None]
OPEN = [r for r in all_routes() if r.role is None]


def route_id(route) -> str:
    return f"{route.method} {route.path}"


# Written down by hand, not derived from the table under test: a route whose role changes,
# or a new route, must change this list too, in the same review.
EXPECTED_ROLES = {
    "POST /v1/workflows/{name}/runs": "operator",
    "GET /v1/runs": "viewer",
    "GET /v1/runs/{run_id}": "viewer",
    "GET /v1/runs/{run_id}/history": "viewer",
    "GET /v1/runs/{run_id}/trace": "viewer",
    "POST /v1/runs/{run_id}/signals/{name}": "operator",
    "POST /v1/runs/{run_id}/cancel": "operator",
    "POST /v1/runs/{run_id}/retry": "operator",
    "GET /v1/runs/{run_id}/wait": "viewer",
    "GET /v1/workflows": "viewer",
    "GET /v1/workflows/{name}": "viewer",
    "GET /v1/workflows/{name}/versions": "viewer",
    "GET /v1/workflows/{name}/versions/{version}": "viewer",
    "GET /v1/dead-letters": "viewer",
    "POST /v1/dead-letters/{id}/replay": "operator",
    "GET /healthz": None,
    "GET /readyz": None,
    "GET /metrics": None,  # scrapers rarely carry tokens; the server binds to loopback by default
    "POST /hooks/{path}": None,  # authenticated by the hook's own HMAC signature
    "GET /openapi.json": None,
    "GET /docs": None,
    "GET /v1/audit": "admin",
    "GET /v1/export/runs": "viewer",
    "GET /v1/export/steps": "viewer",
    "GET /v1/approvals": "viewer",
    "GET /v1/approvals/{token}": None,  # the signed link is the credential
    "POST /v1/approvals/{token}": None,
    "POST /v1/runs/{run_id}/approval": "approver",
    "GET /v1/schedules": "viewer",
    "GET /v1/schedules/{name}": "viewer",
    "GET /v1/schedules/{name}/fires": "viewer",
    "POST /v1/schedules/{name}/pause": "operator",
    "POST /v1/schedules/{name}/resume": "operator",
    "POST /v1/schedules/{name}/run": "operator",
    "GET /v1/calendars": "viewer",
}


def test_every_route_has_the_role_written_down_for_it():
    assert {route_id(r): r.role for r in all_routes()} == EXPECTED_ROLES


def test_role_grants():
    assert GRANTS["viewer"] == {"viewer"}
    assert GRANTS["operator"] == {"operator", "viewer"}
    assert GRANTS["approver"] == {"approver", "viewer"}
    assert GRANTS["admin"] == {"viewer", "operator", "approver", "admin"}


def test_the_parametrised_route_lists_are_not_empty():
    # an import-time mistake that emptied these would silently skip the whole matrix
    assert len(PROTECTED) >= 15 and len(OPEN) >= 6


def test_every_route_declares_a_known_role_or_is_open():
    for route in all_routes():
        assert route.role is None or route.role in ROLES, route_id(route)
    # the ones that must stay open, and only because they carry their own credential or reveal nothing
    open_paths = {r.path for r in OPEN}
    assert {"/healthz", "/readyz"} <= open_paths
    assert not any(p.startswith("/v1/runs") or p.startswith("/v1/workflows") for p in open_paths)


@pytest.mark.parametrize("route", PROTECTED, ids=route_id)
async def test_no_token_is_401_with_a_bearer_challenge(api, route):
    response = await api.request(route.method, concrete(route.path), json={})
    body = await response.json()
    assert response.status == 401, body
    assert body["error"]["code"] == "unauthorized"
    assert route.role in body["error"]["message"]
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("route", PROTECTED, ids=route_id)
async def test_a_wrong_or_malformed_token_is_401(api, route):
    for header in (f"Bearer {new_token()}", f"Basic {TOKENS['admin']}", "Bearer "):
        response = await api.request(route.method, concrete(route.path), json={}, headers={"Authorization": header})
        assert response.status == 401, (header, await response.text())


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("route", PROTECTED, ids=route_id)
async def test_role_matrix(api, route, role):
    response = await api.request(route.method, concrete(route.path), json={}, headers=bearer(role))
    allowed = route.role in GRANTS[role]
    if allowed:
        # past auth: whatever the placeholder request deserves (404, 422, ...), never 401/403
        assert response.status not in (401, 403), await response.text()
        if route_id(route) == "POST /v1/dead-letters/{id}/replay":
            # replay republishes to NATS, which this fixture turns off: 503 is the honest answer
            assert response.status < 500 or response.status == 503, await response.text()
        else:
            assert response.status < 500, await response.text()
    else:
        body = await response.json()
        assert response.status == 403, body
        assert body["error"]["code"] == "forbidden"
        assert f"the {route.role} role" in body["error"]["message"] and f"{role}-bot" in body["error"]["message"]


@pytest.mark.parametrize("route", OPEN, ids=route_id)
async def test_open_routes_never_ask_for_a_bearer_token(api, route):
    response = await api.request(route.method, concrete(route.path), json={})
    assert "WWW-Authenticate" not in response.headers, await response.text()
    assert response.status < 500, await response.text()
    if route.path in ("/healthz", "/readyz", "/openapi.json", "/docs"):
        assert response.status == 200, await response.text()


async def test_the_token_name_is_who_acted_in_history(api):
    response = await api.post("/v1/workflows/approval/runs", json={"input": None}, headers=bearer("operator"))
    run = await response.json()
    assert response.status == 201, run
    history = await (await api.get(f"/v1/runs/{run['run_id']}/history", headers=bearer("viewer"))).json()
    started = next(e for e in history["events"] if e["type"] == "run.started")
    assert started["data"]["by"] == "operator-bot"
    response = await api.post(f"/v1/runs/{run['run_id']}/cancel", json={}, headers=bearer("admin"))
    assert response.status == 202
    history = await (await api.get(f"/v1/runs/{run['run_id']}/history", headers=bearer("viewer"))).json()
    cancelled = next(e for e in history["events"] if e["type"] == "run.cancel_requested")
    assert cancelled["data"]["by"] == "admin-bot"


def test_settings_refuse_duplicate_token_names_and_bad_hashes():
    from server.errors import ConfigError
    from server.settings import load_settings

    token = {"name": "ci", "sha256": "a" * 64, "roles": ["viewer"]}
    with pytest.raises(ConfigError, match="unique"):
        load_settings(auth={"tokens": [token, {**token, "sha256": "b" * 64}]})
    with pytest.raises(ConfigError, match="sha256"):
        load_settings(auth={"tokens": [{**token, "sha256": "not-a-hash"}]})
    with pytest.raises(ConfigError, match="roles"):
        load_settings(auth={"tokens": [{**token, "roles": ["root"]}]})


# --- the command line -------------------------------------------------------------------


def test_serve_refuses_auth_without_tokens(tmp_path):
    config = tmp_path / "baton.yaml"
    config.write_text("auth: {enabled: true}\n")
    env = {"PATH": "/usr/bin:/bin", "BATON_CONFIG": str(config), "BATON_DATA_DIR": str(tmp_path / "data")}
    result = subprocess.run([sys.executable, "-m", "server", "serve"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "no tokens are configured" in result.stderr and "baton token create" in result.stderr
    assert not (tmp_path / "data").exists()  # refused before touching anything


def test_token_create_prints_a_token_whose_hash_is_the_config_entry():
    result = CliRunner().invoke(cli_app, ["token", "create", "deploy-bot", "--role", "operator", "--role", "approver"])
    assert result.exit_code == 0, result.output
    token = re.search(r"^token: (\S+)$", result.output, re.M).group(1)
    entry = re.search(r"\{name: deploy-bot, roles: \[operator, approver\], sha256: ([0-9a-f]{64})\}", result.output)
    assert entry and entry.group(1) == hash_token(token)
    again = CliRunner().invoke(cli_app, ["token", "create", "deploy-bot", "--role", "operator"])
    assert re.search(r"^token: (\S+)$", again.output, re.M).group(1) != token  # random each time
    bad = CliRunner().invoke(cli_app, ["token", "create", "x", "--role", "root"])
    assert bad.exit_code == 2 and "roles" in bad.output


def test_cli_sends_baton_token(tmp_path):
    wf = tmp_path / "wf"
    wf.mkdir()
    (wf / "greet.yaml").write_text(GREET)
    tokens = '[{"name": "ci", "sha256": "%s", "roles": ["operator"]}]' % hash_token(TOKENS["operator"])
    server = ServerProcess(tmp_path / "data", wf, BATON_AUTH__ENABLED="true", BATON_AUTH__TOKENS=tokens,
                           BATON_NATS__ENABLED="false")
    server.start()
    try:
        base = [sys.executable, "-m", "server", "runs", "--url", server.url]
        env = {"PATH": "/usr/bin:/bin", "BATON_CONFIG": str(tmp_path / "data" / "empty-config.yaml")}
        refused = subprocess.run(base, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1 and "viewer role" in refused.stderr, refused.stderr
        ok = subprocess.run(base, cwd=REPO, env={**env, "BATON_TOKEN": TOKENS["operator"]}, capture_output=True,
                            text=True, timeout=60)
        assert ok.returncode == 0, ok.stderr
    finally:
        server.stop()
