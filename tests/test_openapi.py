"""The OpenAPI document and the docs page: valid OpenAPI 3.1, complete for the route
table, and true to what the server really answers (real runtime, real HTTP)."""

from __future__ import annotations

import asyncio
import html
import json
import re

import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import OpenAPIV31SpecValidator
from typer.testing import CliRunner

from server.api.auth import hash_token, new_token
from server.api.openapi import build_document, document, openapi_path, path_params, type_text
from server.api.routes import all_routes
from server.api.table import Param, Route
from server.api.views import RunSummary
from server.cli import app as cli_app
from server.settings import Settings
from tests.inproc import api_client
from tests.sample_workflows import APPROVAL, GREET

GREET_V1 = GREET.replace("version: 2", "version: 1").replace("two echoes in a row", "the first greeting")
ADMIN = new_token()


def _settings(tmp_path, auth: bool = False) -> Settings:
    wf = tmp_path / "wf"
    wf.mkdir(exist_ok=True)
    (wf / "greet-1.yaml").write_text(GREET_V1)
    (wf / "greet.yaml").write_text(GREET)
    (wf / "approval.yaml").write_text(APPROVAL)
    tokens = [{"name": "admin-bot", "sha256": hash_token(ADMIN), "roles": ["admin"]}]
    return Settings(data_dir=tmp_path / "data", workflows=[wf], handler_modules=[], nats={"enabled": False},
                    auth={"enabled": auth, "tokens": tokens if auth else []})


@pytest.fixture
async def api(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # keep the repository's config/baton.yaml out of it
    settings = _settings(tmp_path)
    async with api_client(settings) as client:
        yield client


def walk(node):
    yield node
    if isinstance(node, dict):
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def resolve(doc: dict, node: dict) -> dict:
    while "$ref" in node and node["$ref"].startswith("#/components/") and "/schemas/" not in node["$ref"]:
        section, name = node["$ref"].split("/")[2:]
        node = doc["components"][section][name]
    return node


def operation(doc: dict, route: Route) -> dict:
    return doc["paths"][openapi_path(route.path)][route.method.lower()]


def response_validator(doc: dict, path: str, method: str, status: int, media: str = "application/json"):
    response = resolve(doc, doc["paths"][path][method]["responses"][str(status)])
    schema = response["content"][media]["schema"]
    # the components beside the schema, so `#/components/schemas/...` resolves
    return Draft202012Validator({**schema, "components": doc["components"]})


# --- the document -----------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1():
    doc = document()
    OpenAPIV31SpecValidator(doc).validate()
    assert doc["openapi"].startswith("3.1.")
    # OpenAPI 3.0's `nullable` is not 3.1: null is a type there
    assert not [n for n in walk(doc) if isinstance(n, dict) and "nullable" in n]
    for node in walk(doc):
        if isinstance(node, dict) and "$ref" in node and isinstance(node["$ref"], str):
            section, name = node["$ref"].removeprefix("#/components/").split("/")
            assert name in doc["components"][section], node["$ref"]


def test_every_route_is_documented_once_with_its_role():
    doc, routes = document(), all_routes()
    ids = [operation(doc, r)["operationId"] for r in routes]
    assert len(set(ids)) == len(ids) == sum(len(methods) for methods in doc["paths"].values())
    for route in routes:
        op = operation(doc, route)
        assert op["operationId"] == route.operation_id
        assert op["tags"] == [route.tag] and op["summary"] == route.summary
        assert op["x-baton-role"] == route.role
        assert op["security"] == ([] if route.role is None else [{"bearerAuth": []}])
        assert any(code.startswith("2") for code in op["responses"]), route.path
        placeholders = path_params(route.path)
        documented = [p["name"] for p in op.get("parameters", []) if p["in"] == "path"]
        assert documented == placeholders
        if route.role is not None:
            assert {"401", "403"} <= set(op["responses"])
    scheme = dict(doc["components"]["securitySchemes"]["bearerAuth"])
    assert isinstance(scheme.pop("description", None), str)
    assert scheme == {"type": "http", "scheme": "bearer"}
    assert {t["name"] for t in doc["tags"]} == {r.tag for r in routes}


def test_every_body_and_response_model_is_in_components():
    doc = document()
    schemas = doc["components"]["schemas"]
    for route in all_routes():
        op = operation(doc, route)
        if route.body is not None:
            for content in op["requestBody"]["content"].values():
                name = content["schema"]["$ref"].rsplit("/", 1)[1]
                assert name in schemas and name.startswith(route.body.__name__)
        for status, value in route.responses.items():
            response = resolve(doc, op["responses"][str(status)])
            for part in value if isinstance(value, tuple) else (value,):
                if isinstance(part, type):
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref.rsplit("/", 1)[1].startswith(part.__name__)
                elif isinstance(part, str):
                    assert part in response["content"]


def test_every_error_response_has_the_one_error_shape():
    doc = document()
    for methods in doc["paths"].values():
        for op in methods.values():
            for code, response in op["responses"].items():
                response = resolve(doc, response)
                assert "X-Request-Id" in response["headers"]
                if int(code) >= 400:  # a page for people may also answer it as HTML, never as other JSON
                    assert response["content"]["application/json"] == {"schema": {"$ref": "#/components/schemas/Error"}}


def test_the_generator_reads_only_the_table():
    async def get_thing(request):  # pragma: no cover - never served
        raise AssertionError

    async def post_form(request):  # pragma: no cover - never served
        raise AssertionError

    routes = [
        Route("GET", "/v1/things/{id:\\d+}", get_thing, "viewer", "Get a thing", "things",
              responses={200: RunSummary, 410: None}, params=(Param("id", {"type": "integer"}),
                                                              Param("q", {"type": "string"}, "search", True))),
        Route("POST", "/open", post_form, None, "Post a form", "things", body=RunSummary, body_required=False,
              body_media=("application/x-www-form-urlencoded",), responses={204: None, 200: "text/csv"}),
    ]
    doc = build_document(routes)
    OpenAPIV31SpecValidator(doc).validate()
    get = doc["paths"]["/v1/things/{id}"]["get"]
    assert get["parameters"] == [
        {"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}},
        {"name": "q", "in": "query", "required": True, "schema": {"type": "string"}, "description": "search"},
    ]
    assert set(get["responses"]) == {"200", "400", "401", "403", "404", "410", "503"}
    post = doc["paths"]["/open"]["post"]
    assert post["security"] == [] and post["x-baton-role"] is None
    assert post["requestBody"]["required"] is False
    assert list(post["requestBody"]["content"]) == ["application/x-www-form-urlencoded"]
    assert "content" not in post["responses"]["204"]
    assert post["responses"]["200"]["content"] == {"text/csv": {"schema": {"type": "string"}}}
    assert set(post["responses"]) == {"200", "204", "400", "413", "422"}


def test_type_text_reads_as_types():
    assert type_text({"anyOf": [{"type": "string", "format": "date-time"}, {"type": "null"}]}) == "string (date-time) | null"
    assert type_text({"type": "array", "items": {"$ref": "#/components/schemas/RunSummary"}}) == "array of RunSummary"
    assert type_text({}) == "any JSON"
    assert type_text({"enum": ["json", "csv"]}) == '"json" | "csv"'


# --- served -----------------------------------------------------------------------


async def test_openapi_json_and_docs_are_open_with_auth_on(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = _settings(tmp_path, auth=True)
    async with api_client(settings) as client:
        response = await client.get("/openapi.json")
        assert response.status == 200 and response.content_type == "application/json"
        assert response.headers["X-Request-Id"]
        assert await response.json() == json.loads(json.dumps(document()))
        response = await client.get("/docs")
        assert response.status == 200 and response.content_type == "text/html"
        assert (await client.get("/v1/runs")).status == 401  # the API itself is not open


async def test_the_docs_page_names_every_operation_and_needs_nothing_from_elsewhere(api):
    response = await api.get("/docs")
    page = await response.text()
    assert response.status == 200 and page.startswith("<!doctype html>")
    for path, methods in document()["paths"].items():
        assert html.escape(path) in page, path
        for op in methods.values():
            assert f'id="op-{op["operationId"]}"' in page
    assert "Bearer" in page and "next_cursor" in page and "X-Request-Id" in page
    # self-contained: no script, stylesheet, image or font fetched from anywhere
    assert not re.search(r"<script|<link|<img|@import|url\(", page, re.I)
    assert not re.search(r"(src|href)=\"(https?:)?//", page, re.I)


async def call(client, method: str, path: str, expect: int, template: str | None = None, **kwargs):
    """Call, check the status, and validate the body against the document's schema."""
    response = await client.request(method, path, **kwargs)
    body = await response.json()
    assert response.status == expect, body
    doc = document()
    validator = response_validator(doc, template or path, method.lower(), expect)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(body)]
    assert not errors, (path, errors, body)
    return body


async def test_real_responses_match_their_schemas(api):
    run = await call(api, "POST", "/v1/workflows/greet/runs", 201, "/v1/workflows/{name}/runs",
                     json={"input": {"name": "ada"}, "workflow_id": "w-1"})
    await call(api, "POST", "/v1/workflows/greet/runs", 422, "/v1/workflows/{name}/runs", json={"input": {}})
    await call(api, "POST", "/v1/workflows/nope/runs", 404, "/v1/workflows/{name}/runs", json={})
    done = await call(api, "GET", f"/v1/runs/{run['run_id']}/wait?timeout=10", 200, "/v1/runs/{run_id}/wait")
    assert done["status"] == "succeeded"
    await call(api, "GET", f"/v1/runs/{run['run_id']}", 200, "/v1/runs/{run_id}")
    await call(api, "GET", "/v1/runs/nope", 404, "/v1/runs/{run_id}")
    await call(api, "GET", "/v1/runs?limit=1", 200, "/v1/runs")
    await call(api, "GET", "/v1/runs?limit=x", 400, "/v1/runs")
    await call(api, "GET", f"/v1/runs/{run['run_id']}/history", 200, "/v1/runs/{run_id}/history")
    await call(api, "POST", f"/v1/runs/{run['run_id']}/retry", 409, "/v1/runs/{run_id}/retry")

    gated = await call(api, "POST", "/v1/workflows/approval/runs", 201, "/v1/workflows/{name}/runs", json={})
    path = f"/v1/runs/{gated['run_id']}"
    for _ in range(200):  # bounded: three in-process steps
        if "approve" in (await call(api, "GET", path, 200, "/v1/runs/{run_id}"))["waiting_for"]:
            break
        await call(api, "GET", f"{path}/wait?timeout=0.02", 200, "/v1/runs/{run_id}/wait")
    else:
        raise AssertionError(f"run {gated['run_id']} never waited for the approve signal")
    await call(api, "POST", f"{path}/signals/nope", 409, "/v1/runs/{run_id}/signals/{name}")
    await call(api, "POST", f"{path}/signals/approve", 202, "/v1/runs/{run_id}/signals/{name}", json={"data": 1})
    await call(api, "GET", f"{path}/wait?timeout=10", 200, "/v1/runs/{run_id}/wait")

    cancelled = await call(api, "POST", "/v1/workflows/approval/runs", 201, "/v1/workflows/{name}/runs", json={})
    await call(api, "POST", f"/v1/runs/{cancelled['run_id']}/cancel", 202, "/v1/runs/{run_id}/cancel")
    detail = await call(api, "GET", f"/v1/runs/{cancelled['run_id']}", 200, "/v1/runs/{run_id}")
    assert detail["status"] == "cancelled" and detail["error"]["type"] == "Cancelled"
    await call(api, "POST", f"/v1/runs/{cancelled['run_id']}/retry", 202, "/v1/runs/{run_id}/retry")

    await call(api, "GET", "/v1/workflows", 200)
    await call(api, "GET", "/v1/workflows/approval", 200, "/v1/workflows/{name}")
    await call(api, "GET", "/v1/dead-letters", 200)
    await call(api, "GET", "/healthz", 200)
    await call(api, "GET", "/readyz", 200)


async def test_workflow_versions(api):
    listing = await call(api, "GET", "/v1/workflows/greet/versions", 200, "/v1/workflows/{name}/versions")
    latest = await call(api, "GET", "/v1/workflows/greet", 200, "/v1/workflows/{name}")
    assert listing["name"] == "greet"
    assert [(v["version"], v["latest"], v["description"]) for v in listing["versions"]] == [
        ("1", False, "the first greeting"), ("2", True, "two echoes in a row"),
    ]
    assert listing["versions"][1]["def_hash"] == latest["def_hash"] != listing["versions"][0]["def_hash"]

    template = "/v1/workflows/{name}/versions/{version}"
    first = await call(api, "GET", "/v1/workflows/greet/versions/1", 200, template)
    assert first["version"] == "1" and first["latest"] is False and first["def_hash"] == listing["versions"][0]["def_hash"]
    assert first["definition"]["name"] == "greet" and first["definition"]["version"] == "1"
    assert [s["id"] for s in first["definition"]["steps"]] == ["hello", "shout"]
    assert first["definition"]["input_schema"]["required"] == ["name"]

    missing = await call(api, "GET", "/v1/workflows/greet/versions/9", 404, template)
    assert missing["error"]["field"] == "version" and "loaded: 1, 2" in missing["error"]["message"]
    missing = await call(api, "GET", "/v1/workflows/nope/versions", 404, "/v1/workflows/{name}/versions")
    assert missing["error"]["field"] == "name"
    await call(api, "GET", "/v1/workflows/nope/versions/1", 404, template)


async def test_history_pages_end_with_next_after_null(api):
    run = await call(api, "POST", "/v1/workflows/greet/runs", 201, "/v1/workflows/{name}/runs",
                     json={"input": {"name": "ada"}})
    path = f"/v1/runs/{run['run_id']}"
    await call(api, "GET", f"{path}/wait?timeout=10", 200, "/v1/runs/{run_id}/wait")
    whole = await call(api, "GET", f"{path}/history", 200, "/v1/runs/{run_id}/history")
    assert whole["next_after"] is None and len(whole["events"]) > 3

    events, after, pages = [], 0, 0
    while after is not None:
        page = await call(api, "GET", f"{path}/history?limit=2&after={after}", 200, "/v1/runs/{run_id}/history")
        assert len(page["events"]) == 2 or page["next_after"] is None
        events += page["events"]
        after, pages = page["next_after"], pages + 1
    assert events == whole["events"] and pages == (len(events) + 1) // 2

    exact = len(whole["events"])  # a page that ends exactly at the end says so: no empty page after it
    page = await call(api, "GET", f"{path}/history?limit={exact}", 200, "/v1/runs/{run_id}/history")
    assert page["next_after"] is None

    response = await api.get(f"{path}/history?format=csv&limit=2")
    assert response.status == 200 and response.headers["X-Next-After"] == str(whole["events"][1]["seq"])
    response = await api.get(f"{path}/history?format=csv&limit={exact}")
    assert "X-Next-After" not in response.headers


@pytest.mark.parametrize("raw, status", [("²", 400), ("x1", 400), ("99999999999999999999", 400)])
async def test_dead_letter_ids_that_are_not_ids(api, raw, status):
    await call(api, "POST", f"/v1/dead-letters/{raw}/replay", status, "/v1/dead-letters/{id}/replay")


async def test_the_cli_lists_a_workflows_versions(api):
    url = str(api.make_url("")).rstrip("/")
    result = await asyncio.to_thread(CliRunner().invoke, cli_app, ["workflows", "greet", "--url", url])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.stdout.splitlines() if "greeting" in line or "echoes" in line]
    assert re.search(r"^\W*1\s.*the first greeting", rows[0]) and "yes" not in rows[0]
    assert re.search(r"^\W*2\s.*yes.*two echoes", rows[1])
    result = await asyncio.to_thread(CliRunner().invoke, cli_app, ["workflows", "nope", "--url", url])
    assert result.exit_code == 1 and "unknown workflow 'nope'" in result.stderr


@pytest.mark.parametrize("cursor", ["²", "-1", "99999999999999999999"])
async def test_dead_letter_cursors_that_are_not_cursors(api, cursor):
    body = await call(api, "GET", f"/v1/dead-letters?cursor={cursor}", 400, "/v1/dead-letters")
    assert body["error"]["field"] == "cursor"
