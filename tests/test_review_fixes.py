"""Review fixes, through real HTTP against the real runtime and SQLite.

* ids and cursors that are ids: only ASCII digits within SQLite's 64-bit range
  (`²` passes isdigit, 30 digits overflow the driver) are 400s naming the field;
* a path logged on an error hides an approval link's token;
* an approval decision's audit entry names the approval and the run.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, make_mocked_request

from server.api.errors import loggable_path
from server.settings import Settings
from tests.inproc import api_client, call

BOUND_S = 10.0  # every wait below is for a condition, bounded by this
PUBLIC_URL = "https://baton.example.test"
GATED = """\
name: gated
steps:
  - id: gate
    wait_for_signal: {approval: {message: ok?}}
"""
NOT_IDS = ["²", "1" * 30, "-1"]


@pytest.fixture
async def api(tmp_path, monkeypatch) -> AsyncIterator[TestClient]:
    monkeypatch.chdir(tmp_path)  # keep the repository's config/baton.yaml out of it
    wf = tmp_path / "wf"
    wf.mkdir()
    (wf / "gated.yaml").write_text(GATED)
    settings = Settings(data_dir=tmp_path / "data", workflows=[wf], handler_modules=[], public_url=PUBLIC_URL,
                        auth={"enabled": False}, nats={"enabled": False})
    async with api_client(settings) as client:
        yield client


@pytest.mark.parametrize("raw", NOT_IDS)
@pytest.mark.parametrize("path", ["/v1/audit?cursor={}", "/v1/dead-letters?cursor={}"])
async def test_a_cursor_that_is_no_id_is_400(api, path, raw):
    body = await call(api, "GET", path.format(raw), 400)
    assert body["error"]["field"] == "cursor" and raw in body["error"]["message"]


@pytest.mark.parametrize("raw", NOT_IDS)
async def test_a_dead_letter_id_that_is_no_id_is_400(api, raw):
    body = await call(api, "POST", f"/v1/dead-letters/{raw}/replay", 400)
    assert body["error"]["field"] == "id"


async def test_the_largest_id_is_still_an_id(api):
    page = await call(api, "GET", f"/v1/audit?cursor={2**63 - 1}", 200)
    assert isinstance(page["entries"], list)


def test_a_logged_path_hides_a_links_token():
    token = "eyJpZCI6InIxOmdhdGU6MSJ9.c2lnbmF0dXJl"
    request = make_mocked_request("POST", f"/v1/approvals/{token}", match_info={"token": token})
    assert loggable_path(request) == "/v1/approvals/[redacted]"
    run = make_mocked_request("POST", "/v1/runs/r-1/cancel", match_info={"run_id": "r-1"})
    assert loggable_path(run) == "/v1/runs/r-1/cancel"


async def pending_approval(client: TestClient, run_id: str) -> dict[str, Any]:
    """The run's one pending approval, once the run reaches its gate."""
    deadline = time.monotonic() + BOUND_S
    while time.monotonic() < deadline:
        page = await call(client, "GET", f"/v1/approvals?run_id={run_id}", 200)
        if page["approvals"]:
            (approval,) = page["approvals"]
            return approval
        await client.get(f"/v1/runs/{run_id}/wait?timeout=0.02")
    raise AssertionError(f"run {run_id} never asked for an approval")


async def audit_entry_of(client: TestClient, approval_id: str) -> dict[str, Any]:
    entries = (await call(client, "GET", "/v1/audit?limit=500", 200))["entries"]
    (entry,) = [e for e in entries if e["detail"].get("approval") == approval_id]
    return entry


async def test_a_decision_by_link_is_audited_with_its_approval_and_run(api):
    run_id = (await call(api, "POST", "/v1/workflows/gated/runs", 201, json={}))["run_id"]
    approval = await pending_approval(api, run_id)
    link = approval["link"][len(PUBLIC_URL):]
    await call(api, "POST", link, 200, json={"decision": "approve"})
    entry = await audit_entry_of(api, approval["id"])
    assert entry["action"] == "decide_by_link" and entry["status"] == 200
    assert entry["detail"]["run_id"] == run_id and entry["target"] == "approval:[redacted]"


async def test_a_decision_by_the_run_route_is_audited_with_its_approval_and_run(api):
    run_id = (await call(api, "POST", "/v1/workflows/gated/runs", 201, json={}))["run_id"]
    approval = await pending_approval(api, run_id)
    await call(api, "POST", f"/v1/runs/{run_id}/approval", 200, json={"decision": "reject"})
    entry = await audit_entry_of(api, approval["id"])
    assert entry["action"] == "decide_run_approval" and entry["status"] == 200
    assert entry["detail"]["run_id"] == run_id and entry["target"] == f"run:{run_id}"
