"""Webhook triggers over real HTTP (aiohttp on loopback) with the real runtime and SQLite:
signatures, replays, dedupe, the status of each refusal, what the run keeps, and the
loader's checks. The signature functions are also tested on their own, against
GitHub's published example and against the `openssl` line the README shows."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import orjson
import pytest

from tests.inproc import api_client
from server.api.auth import hash_token, new_token
from server.api.hooks import HookAccepted
from server.definitions.loader import load_paths
from server.errors import Unauthorized
from server.settings import Settings
from server.triggers.events import event_run_id
from server.triggers.webhooks import (
    sign_github, sign_hmac, verify_github, verify_hmac, webhook_event,
)

GH_SECRET = "gh-" + uuid.uuid4().hex  # random per run, so finding it anywhere means a leak
SHOP_SECRET = "shop-" + uuid.uuid4().hex
MAX_BODY_BYTES = 4096

DEPLOY = """\
name: deploy
input_schema:
  type: object
  required: [ref, repo]
  properties: {ref: {type: string}, repo: {type: string}}
triggers:
  - webhook:
      path: github-push
      secret: {env: TEST_GH_SECRET}
      signature: github
      filter: "(event.headers['x-github-event'] | default('')) == 'push'"
      input: {ref: "{{ event.data.ref }}", repo: "{{ event.data.repository.full_name }}"}
steps:
  - id: note
    task: echo
    input: {ref: "{{ input.ref }}", hook: "{{ event.hook }}"}
"""

ORDERS = """\
name: orders
input_schema:
  type: object
  required: [order_id]
  properties: {order_id: {type: string}, amount: {type: number}}
triggers:
  - webhook: {path: new-order, secret: {env: TEST_SHOP_SECRET}, signature: hmac-sha256}
steps:
  - id: note
    task: echo
    input: {order: "{{ input.order_id }}"}
"""

UNSET = """\
name: unset
triggers:
  - webhook: {path: no-secret, secret: {env: TEST_NEVER_SET_SECRET}, signature: github}
steps:
  - id: note
    task: echo
"""

PUSH = {"ref": "refs/heads/main", "repository": {"full_name": "acme/shop"}, "after": "abc123"}


def webhook_settings(tmp_path, monkeypatch, auth=None):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TEST_GH_SECRET", GH_SECRET)
    monkeypatch.setenv("TEST_SHOP_SECRET", SHOP_SECRET)
    monkeypatch.delenv("TEST_NEVER_SET_SECRET", raising=False)
    wf = tmp_path / "wf"
    wf.mkdir()
    for name, text in (("deploy", DEPLOY), ("orders", ORDERS), ("unset", UNSET)):
        (wf / f"{name}.yaml").write_text(text)
    settings = Settings(data_dir=tmp_path / "data", workflows=[wf], handler_modules=[], nats={"enabled": False},
                        limits={"max_body_bytes": MAX_BODY_BYTES}, auth=auth or {"enabled": False})
    return settings


@pytest.fixture
async def api(tmp_path, monkeypatch):
    settings = webhook_settings(tmp_path, monkeypatch)
    async with api_client(settings) as client:
        yield client


def github_headers(body: bytes, delivery: str | None = None, event: str = "push", **extra) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "X-GitHub-Event": event,
               "X-Hub-Signature-256": sign_github(GH_SECRET.encode(), body), **extra}
    if delivery is not None:
        headers["X-GitHub-Delivery"] = delivery
    return headers


def shop_headers(body: bytes, at: float | None = None, delivery: str | None = None) -> dict[str, str]:
    headers = {"Content-Type": "application/json",
               "X-Baton-Signature": sign_hmac(SHOP_SECRET.encode(), body, int(time.time() if at is None else at))}
    if delivery is not None:
        headers["X-Baton-Delivery"] = delivery
    return headers


async def post(client, path: str, body: bytes, headers: dict[str, str], expect: int) -> dict:
    response = await client.post(path, data=body, headers=headers)
    answer = await response.json()
    assert response.status == expect, answer
    return answer


async def get(client, path: str, **kwargs) -> dict:
    response = await client.get(path, **kwargs)
    answer = await response.json()
    assert response.status == 200, answer
    return answer


async def started_event(client, run_id: str, **kwargs) -> dict:
    history = await get(client, f"/v1/runs/{run_id}/history", **kwargs)
    return next(e for e in history["events"] if e["type"] == "run.started")["data"]


async def runs_of(client, workflow: str) -> list[dict]:
    return (await get(client, f"/v1/runs?workflow={workflow}&limit=500"))["runs"]


# --- deliveries that start runs ------------------------------------------------------


async def test_a_github_signed_push_starts_a_run(api):
    body = orjson.dumps(PUSH)
    delivery = str(uuid.uuid4())
    answer = await post(api, "/hooks/github-push", body, github_headers(body, delivery), 202)
    assert answer["hook"] == "github-push" and answer["delivery"] == delivery
    assert answer["duplicate"] is False and answer["filtered"] is False
    HookAccepted.model_validate(answer)  # what the OpenAPI document promises
    [run] = answer["runs"]
    assert run["workflow"] == "deploy" and run["created"] is True
    assert run["run_id"] == event_run_id(f"hook:github-push:{delivery}", "deploy", 0)
    done = await get(api, f"/v1/runs/{run['run_id']}/wait?timeout=10")
    assert done["status"] == "succeeded"
    detail = await get(api, f"/v1/runs/{run['run_id']}")
    assert detail["input"] == {"ref": "refs/heads/main", "repo": "acme/shop"}
    assert detail["steps"][0]["output"] == {"ref": "refs/heads/main", "hook": "github-push"}
    started = await started_event(api, run["run_id"])
    assert started["by"] == "hook:github-push"
    event = started["event"]
    assert event["type"] == "webhook" and event["hook"] == "github-push" and event["delivery"] == delivery
    assert event["data"] == PUSH and event["headers"]["x-github-event"] == "push"


async def test_an_hmac_signed_delivery_starts_a_run_with_the_body_as_input(api):
    body = orjson.dumps({"order_id": "o-1", "amount": 5})
    answer = await post(api, "/hooks/new-order", body, shop_headers(body), 202)
    assert answer["delivery"] is None
    detail = await get(api, f"/v1/runs/{answer['runs'][0]['run_id']}")
    assert detail["input"] == {"order_id": "o-1", "amount": 5}


async def test_several_v1_signatures_one_of_them_right_is_accepted(api):
    """A sender rotating its secret signs with the old and the new one."""
    body = orjson.dumps({"order_id": "o-rot"})
    now = int(time.time())
    right = sign_hmac(SHOP_SECRET.encode(), body, now).split(",v1=")[1]
    old = sign_hmac(b"the old secret", body, now).split(",v1=")[1]
    headers = {"Content-Type": "application/json; charset=utf-8", "X-Baton-Signature": f"t={now}, v1={old}, v1={right}"}
    await post(api, "/hooks/new-order", body, headers, 202)


async def test_a_traceparent_becomes_part_of_the_runs_event(api):
    body = orjson.dumps(PUSH)
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    headers = github_headers(body, traceparent=parent, tracestate="acme=1")
    answer = await post(api, "/hooks/github-push", body, headers, 202)
    event = (await started_event(api, answer["runs"][0]["run_id"]))["event"]
    assert event["traceparent"] == parent and event["tracestate"] == "acme=1"
    # a malformed one is not passed on (W3C Trace Context: ignore what does not parse)
    answer = await post(api, "/hooks/github-push", body, github_headers(body, traceparent="00-zz-01"), 202)
    assert "traceparent" not in (await started_event(api, answer["runs"][0]["run_id"]))["event"]


async def test_a_false_filter_starts_nothing(api):
    body = orjson.dumps({"zen": "Design for failure.", "hook_id": 1})
    answer = await post(api, "/hooks/github-push", body, github_headers(body, str(uuid.uuid4()), event="ping"), 202)
    assert answer["runs"] == [] and answer["filtered"] is True and answer["duplicate"] is False
    assert await runs_of(api, "deploy") == []


# --- replays and duplicates ----------------------------------------------------------


async def test_a_replayed_delivery_id_answers_the_same_run_and_starts_none(api):
    body = orjson.dumps(PUSH)
    delivery = str(uuid.uuid4())
    first = await post(api, "/hooks/github-push", body, github_headers(body, delivery), 202)
    again = await post(api, "/hooks/github-push", body, github_headers(body, delivery), 202)
    assert again["duplicate"] is True and again["runs"] == first["runs"]
    assert [r["run_id"] for r in await runs_of(api, "deploy")] == [first["runs"][0]["run_id"]]
    # a different delivery of the same body is a new event
    other = await post(api, "/hooks/github-push", body, github_headers(body, str(uuid.uuid4())), 202)
    assert other["duplicate"] is False and other["runs"][0]["run_id"] != first["runs"][0]["run_id"]
    # without a delivery id nothing is deduplicated: each call starts a run
    await post(api, "/hooks/github-push", body, github_headers(body), 202)
    await post(api, "/hooks/github-push", body, github_headers(body), 202)
    assert len(await runs_of(api, "deploy")) == 4


async def test_concurrent_copies_of_one_delivery_start_one_run(api):
    body = orjson.dumps({"order_id": "o-race"})
    delivery = "race-" + uuid.uuid4().hex
    answers = await asyncio.gather(*(
        post(api, "/hooks/new-order", body, shop_headers(body, delivery=delivery), 202) for _ in range(8)))
    run_ids = {a["runs"][0]["run_id"] for a in answers}
    assert len(run_ids) == 1
    assert sorted(a["duplicate"] for a in answers) == [False] + [True] * 7
    assert [r["run_id"] for r in await runs_of(api, "orders")] == list(run_ids)


async def test_a_filtered_delivery_replayed_is_a_filtered_duplicate(api):
    body = orjson.dumps({"zen": "Keep it logically awesome."})
    headers = github_headers(body, "ping-1", event="ping")
    await post(api, "/hooks/github-push", body, headers, 202)
    again = await post(api, "/hooks/github-push", body, headers, 202)
    assert again == {"hook": "github-push", "delivery": "ping-1", "runs": [], "duplicate": True, "filtered": True}


# --- refusals, in the order they are checked -----------------------------------------


async def test_unknown_hook_is_404(api):
    body = orjson.dumps(PUSH)
    answer = await post(api, "/hooks/nope", body, github_headers(body), 404)
    assert answer["error"]["code"] == "not_found" and "/hooks/nope" in answer["error"]["message"]


async def test_a_hook_whose_secret_is_missing_is_503_naming_the_variable(api):
    body = orjson.dumps(PUSH)
    answer = await post(api, "/hooks/no-secret", body, github_headers(body), 503)
    assert "TEST_NEVER_SET_SECRET" in answer["error"]["message"]
    await post(api, "/hooks/github-push", body, github_headers(body), 202)  # the others keep working


async def test_an_oversize_body_is_413(api):
    body = orjson.dumps({"order_id": "o-big", "pad": "x" * MAX_BODY_BYTES})
    answer = await post(api, "/hooks/new-order", body, shop_headers(body), 413)
    assert answer["error"]["code"] == "payload_too_large"

    async def chunks():  # no Content-Length: the server's read limit stops it
        yield body[:100]
        yield body[100:]

    response = await api.post("/hooks/new-order", data=chunks(), headers=shop_headers(body))
    assert response.status == 413, await response.text()
    assert await runs_of(api, "orders") == []


async def test_a_body_not_declared_json_is_415(api):
    body = orjson.dumps(PUSH)
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        headers = {**github_headers(body), "Content-Type": content_type}
        answer = await post(api, "/hooks/github-push", body, headers, 415)
        assert answer["error"]["code"] == "unsupported_media_type" and content_type in answer["error"]["message"]
    # vendor JSON types are JSON
    headers = {**github_headers(body), "Content-Type": "application/vnd.acme+json"}
    await post(api, "/hooks/github-push", body, headers, 202)


async def test_a_wrong_or_missing_github_signature_is_401(api):
    body = orjson.dumps(PUSH)
    wrong = {**github_headers(body), "X-Hub-Signature-256": sign_github(b"not the secret", body)}
    answer = await post(api, "/hooks/github-push", body, wrong, 401)
    assert answer["error"]["code"] == "unauthorized" and "does not match" in answer["error"]["message"]
    tampered = orjson.dumps({**PUSH, "ref": "refs/heads/evil"})
    await post(api, "/hooks/github-push", tampered, github_headers(body), 401)
    missing = {k: v for k, v in github_headers(body).items() if k != "X-Hub-Signature-256"}
    answer = await post(api, "/hooks/github-push", body, missing, 401)
    assert "missing X-Hub-Signature-256" in answer["error"]["message"]
    # the other scheme's header does not stand in for this one
    await post(api, "/hooks/github-push", body, {**missing, **shop_headers(body)}, 401)
    assert await runs_of(api, "deploy") == []


async def test_a_stale_or_future_timestamp_is_401(api):
    body = orjson.dumps({"order_id": "o-late"})
    answer = await post(api, "/hooks/new-order", body, shop_headers(body, at=time.time() - 600), 401)
    assert re.search(r"timestamp is 60\ds old", answer["error"]["message"]) and "300s" in answer["error"]["message"]
    answer = await post(api, "/hooks/new-order", body, shop_headers(body, at=time.time() + 600), 401)
    assert "in the future" in answer["error"]["message"]
    await post(api, "/hooks/new-order", body, {**shop_headers(body), "X-Baton-Signature": "v1=abc"}, 401)
    await post(api, "/hooks/new-order", body, {"Content-Type": "application/json"}, 401)
    assert await runs_of(api, "orders") == []


async def test_a_signed_body_that_is_not_json_is_400(api):
    body = b'{"order_id": "o-1",'
    answer = await post(api, "/hooks/new-order", body, shop_headers(body), 400)
    assert answer["error"]["code"] == "bad_json"


async def test_input_against_the_schema_is_422_naming_the_field(api):
    body = orjson.dumps({"order_id": 42})
    answer = await post(api, "/hooks/new-order", body, shop_headers(body, delivery="d-422"), 422)
    assert answer["error"]["code"] == "invalid_input" and answer["error"]["field"] == "input.order_id"
    # a trigger template that cannot render this body is also the body's fault
    body = orjson.dumps({"ref": "refs/heads/main"})  # no repository
    answer = await post(api, "/hooks/github-push", body, github_headers(body), 422)
    assert "input" in answer["error"]["message"] and answer["error"]["field"] == "body"
    # a refused delivery is not recorded: fixed and sent again, it starts its run
    body = orjson.dumps({"order_id": "o-fixed"})
    answer = await post(api, "/hooks/new-order", body, shop_headers(body, delivery="d-422"), 202)
    assert answer["duplicate"] is False and len(answer["runs"]) == 1


async def test_an_invalid_delivery_id_is_400(api):
    body = orjson.dumps({"order_id": "o-1"})
    headers = {**shop_headers(body), "X-Baton-Delivery": "x" * 201}
    answer = await post(api, "/hooks/new-order", body, headers, 400)
    assert answer["error"]["field"] == "X-Baton-Delivery"


# --- secrets stay out; tokens are not needed -----------------------------------------


async def test_secrets_and_signatures_stay_out_of_history_and_the_store(api, tmp_path):
    body = orjson.dumps(PUSH)
    headers = github_headers(body, "d-secret", Authorization="Bearer bt_should-not-be-kept", Cookie="session=s3cr3t")
    answer = await post(api, "/hooks/github-push", body, headers, 202)
    run_id = answer["runs"][0]["run_id"]
    await get(api, f"/v1/runs/{run_id}/wait?timeout=10")
    history = orjson.dumps(await get(api, f"/v1/runs/{run_id}/history")).decode()
    event = (await started_event(api, run_id))["event"]
    assert not {"authorization", "cookie", "x-hub-signature-256"} & set(event["headers"])
    for secret in (GH_SECRET, headers["X-Hub-Signature-256"][7:], "bt_should-not-be-kept", "s3cr3t"):
        assert secret not in history
    stored = b"".join(p.read_bytes() for p in (tmp_path / "data").iterdir() if p.is_file())
    for secret in (GH_SECRET, headers["X-Hub-Signature-256"][7:], "bt_should-not-be-kept", "s3cr3t"):
        assert secret.encode() not in stored


async def test_hooks_need_no_bearer_token_when_auth_is_on(tmp_path, monkeypatch):
    token = new_token()
    auth = {"enabled": True, "tokens": [{"name": "ops", "sha256": hash_token(token), "roles": ["admin"]}]}
    settings = webhook_settings(tmp_path, monkeypatch, auth=auth)
    async with api_client(settings) as client:
        body = orjson.dumps(PUSH)
        answer = await post(client, "/hooks/github-push", body, github_headers(body), 202)
        response = await client.get("/v1/runs")
        assert response.status == 401  # the API itself still needs a token
        bearer = {"Authorization": f"Bearer {token}"}
        started = await started_event(client, answer["runs"][0]["run_id"], headers=bearer)
        assert started["by"] == "hook:github-push"
        # a signature is still required: a bearer token does not stand in for it
        unsigned = {"Content-Type": "application/json", **bearer}
        await post(client, "/hooks/github-push", body, unsigned, 401)


# --- the loader ------------------------------------------------------------------------


def load(tmp_path, **files: str) -> list[str]:
    for name, text in files.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    return load_paths([tmp_path])[1]


def test_two_workflows_may_not_serve_one_path(tmp_path):
    other = ORDERS.replace("name: orders", "name: orders-too")
    problems = load(tmp_path, a=ORDERS, b=other)
    assert len(problems) == 1, problems
    # the second file's line, and the first file's, so both are easy to find
    assert problems[0].startswith(f"{tmp_path / 'b.yaml'}:7: triggers[0].webhook.path: ")
    assert f"{tmp_path / 'a.yaml'}:7" in problems[0] and "'orders'" in problems[0]


def test_an_older_version_may_keep_the_path_its_successor_took(tmp_path):
    v1 = ORDERS.replace("name: orders", "name: orders\nversion: 1")
    v2 = ORDERS.replace("name: orders", "name: orders\nversion: 2")
    moved = ORDERS.replace("name: orders", "name: intake\nversion: 2")
    assert load(tmp_path, a=v1, b=v2) == []
    # a different workflow taking a path only an OLD version of `orders` serves is fine too
    v3 = v2.replace("version: 2", "version: 3").replace("path: new-order", "path: order-v3")
    (tmp_path / "b.yaml").unlink()
    assert load(tmp_path, c=v3, d=moved) == []


def test_one_workflow_may_not_serve_a_path_twice(tmp_path):
    twice = ORDERS.replace("triggers:\n", "triggers:\n  - webhook: {path: new-order, secret: {env: X}, "
                           "signature: github}\n")
    problems = load(tmp_path, a=twice)
    assert problems == [f"{tmp_path / 'a.yaml'}:8: triggers[1].webhook.path: "
                        "webhook path 'new-order' is already served by triggers[0]"]


@pytest.mark.parametrize("hook, line, expected", [
    ("{path: p, secret: {env: S}, signature: sha1}", 3, "triggers[0].webhook.signature: Input should be 'github' or 'hmac-sha256'"),
    ("{path: p, signature: github}", 3, "triggers[0].webhook.secret: Field required"),
    ("{path: p, secret: hunter2, signature: github}", 3, "secret is never written in a workflow file"),
    ("{path: p, secret: {env: 'not a name'}, signature: github}", 3, "triggers[0].webhook.secret.env: String should match"),
    ("{path: '../etc', secret: {env: S}, signature: github}", 3, "triggers[0].webhook.path: String should match"),
    ("{path: p, secret: {env: S}, signature: github, tolerance: 60}", 3, "tolerance belongs to hmac-sha256"),
    ("{path: p, secret: {env: S}, signature: hmac-sha256, tolerance: 0}", 3, "tolerance: Input should be greater than 0"),
    ("{path: p, secret: {env: S}, signature: github, filter: 'event.data.x >'}", 3, "triggers[0].webhook.filter: "),
    ("{path: p, secret: {env: S}, signature: github, input: '{{ event.data. }}'}", 3, "triggers[0].webhook.input: "),
])
def test_loader_refuses_bad_webhooks_with_file_and_line(tmp_path, hook, line, expected):
    text = f"name: bad\ntriggers:\n  - webhook: {hook}\nsteps:\n  - id: a\n    task: echo\n"
    problems = load(tmp_path, bad=text)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{tmp_path / 'bad.yaml'}:{line}: ") and expected in problems[0], problems


# --- the signature functions -----------------------------------------------------------


def test_github_signature_matches_githubs_published_example():
    # From GitHub's "Validating webhook deliveries" documentation.
    secret, body = b"It's a Secret to Everybody", b"Hello, World!"
    expected = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    assert sign_github(secret, body) == expected
    verify_github(secret, body, expected)
    verify_github(secret, body, expected.upper().replace("SHA256=", "sha256="))  # hex case does not matter
    for bad in (None, "", "sha1=" + expected[7:], "sha256=xyz", "sha256=" + "0" * 64, expected + "00"):
        with pytest.raises(Unauthorized):
            verify_github(secret, body, bad)
    with pytest.raises(Unauthorized):
        verify_github(secret, body + b" ", expected)


def test_hmac_signature_signs_timestamp_dot_body():
    secret, body, t = b"k", b'{"a":1}', 1_700_000_000
    v1 = hmac.new(secret, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign_hmac(secret, body, t) == f"t={t},v1={v1}"
    verify_hmac(secret, body, f"t={t},v1={v1}", now=t + 299, tolerance_s=300)
    verify_hmac(secret, body, f"t={t},v1={v1}", now=t - 299, tolerance_s=300)
    verify_hmac(secret, body, f"v1=00,t={t},v9=ignored,v1={v1.upper()}", now=t, tolerance_s=300)
    cases = {
        "stale": (f"t={t},v1={v1}", t + 301),
        "future": (f"t={t},v1={v1}", t - 301),
        "another t": (f"t={t + 1},v1={v1}", t),
        "no t": (f"v1={v1}", t),
        "no v1": (f"t={t}", t),
        "t not an integer": (f"t={t}.5,v1={v1}", t),
        "missing": (None, t),
    }
    for case, (header, now) in cases.items():
        with pytest.raises(Unauthorized):
            verify_hmac(secret, body, header, now=now, tolerance_s=300)
            pytest.fail(case)


def readme_curl() -> str:
    """The README's example, as the README shows it (the sh block of its "Webhooks" section that calls curl)."""
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("## Webhooks"):]
    block = next(b for b in re.findall(r"```sh\n(.*?)```", section, re.S) if "curl" in b and "X-Baton-Signature" in b)
    return "\n".join(line for line in block.splitlines() if not line.startswith("#"))


@pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("curl")), reason="needs openssl and curl")
async def test_the_readme_curl_call_starts_a_run(api):
    """The one shell line the README shows computes what Baton checks, and the call works."""
    script = readme_curl().replace("http://127.0.0.1:8080", str(api.make_url("")).rstrip("/"))
    env = {"PATH": "/usr/bin:/bin", "SHOP_HOOK_SECRET": SHOP_SECRET}
    for _ in range(2):  # the second call is a redelivery
        # its own process group, so a kill reaches curl as well as bash
        proc = await asyncio.create_subprocess_exec("bash", "-c", script, env=env, stdout=subprocess.PIPE,
                                                    stderr=subprocess.PIPE, start_new_session=True)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
        finally:
            if proc.returncode is None:  # timed out (or cancelled): no curl left running after the test
                os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        assert proc.returncode == 0, err.decode()
        status_line, *_, body = out.decode().strip().splitlines()
        assert " 202 " in status_line, out.decode()
    answer = orjson.loads(body)
    assert answer["delivery"] == "order-o-42" and answer["duplicate"] is True
    assert (await get(api, f"/v1/runs/{answer['runs'][0]['run_id']}"))["input"] == {"order_id": "o-42", "amount": 12.5}


def test_webhook_event_drops_credentials_and_joins_repeated_headers():
    headers = [("Authorization", "Bearer x"), ("Cookie", "a=b"), ("X-Hub-Signature", "sha1=.."),
               ("X-Api-Key", "k"), ("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-For", "10.0.0.2"),
               ("Traceparent", "00-" + "0" * 32 + "-b7ad6b7169203331-01")]
    from multidict import CIMultiDict

    event = webhook_event("p", None, {"a": 1}, CIMultiDict(headers))
    assert event["headers"] == {"x-forwarded-for": "10.0.0.1, 10.0.0.2", "traceparent": headers[-1][1]}
    assert "traceparent" not in event  # an all-zero trace id is invalid (W3C Trace Context §3.2.2.3)
