"""The OpenAPI 3.1 document and the docs page, both built from the route table only.

Rules:
* `server.api.routes.all_routes()` is the one source: each `Route` gives its path,
  method, operationId (the handler's name), tag, summary, role, query and path
  parameters, request body model and response models. Nothing is declared twice.
* Schemas come from pydantic (`models_json_schema`), request bodies in validation
  mode and responses in serialization mode, all under `components/schemas`. Pydantic
  writes JSON Schema 2020-12, the dialect of OpenAPI 3.1 (nullable is
  `anyOf [..., {"type": "null"}]`, never OpenAPI 3.0's `nullable`).
* Error responses are added from what a route can meet, all with the one `Error`
  schema (server/api/errors.py): 401/403 when it needs a role, 400/413/422 when it
  takes a body, 400 when it reads query parameters, 404 when its path names a
  resource, 503 for the /v1 API (the store failing, or the runtime starting up or
  shutting down). A route adds the rest (409, 410, 415, ...) in its `responses`;
  one whose errors may also come as a page for people says so per status, e.g.
  `404: (None, "text/html")` (None is the JSON error).
* Every response carries `X-Request-Id` (the errors middleware stamps it).
* The document is built once per process, on first use: the table does not change
  while the server runs.
"""

from __future__ import annotations

import functools
import http
import importlib.metadata
import importlib.resources
import inspect
import re
from collections.abc import Iterable
from typing import Any

import jinja2
import markupsafe
import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict
from pydantic.json_schema import models_json_schema

from server.api.errors import _SAFE_REQUEST_ID, REQUEST_ID  # the one definition of a sane id
from server.api.table import Route
from server.api.views import Error

OPENAPI_VERSION = "3.1.0"
SCHEMA_REF = "#/components/schemas/{model}"
JSON = "application/json"
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::[^{}]*)?\}")  # aiohttp's {name} or {name:regex}

# The error statuses documented in components/responses, and when each is given.
ERRORS: dict[int, tuple[str, str]] = {
    400: ("BadRequest", "The request cannot be read: malformed JSON, a bad query parameter or path value"),
    401: ("Unauthorized", "No bearer token, or one the server does not know"),
    403: ("Forbidden", "The token's roles do not include the role this operation needs"),
    404: ("NotFound", "No such resource (run, workflow, dead letter, ...)"),
    409: ("Conflict", "The resource is not in a state that allows this (a finished run, a gate not open, ...)"),
    410: ("Gone", "The resource existed but is no longer usable"),
    413: ("PayloadTooLarge", "The request body is larger than the server's limit"),
    415: ("UnsupportedMediaType", "The request body's media type is not one this operation reads"),
    422: ("InvalidInput", "The request is well-formed but wrong: `error.field` names the part at fault"),
    503: ("Unavailable", "The server is starting up, shutting down or its store is failing; retry later"),
}

TAGS: dict[str, str] = {
    "runs": "Start, list, inspect and steer workflow runs",
    "workflows": "The workflow definitions the server has loaded, with every version",
    "dead letters": "Events that could not start a run, and their replay",
    "probes": "Liveness and readiness, for load balancers and orchestrators",
    "docs": "This document and its human-readable page",
}

INTRO = """\
Baton's HTTP API. All request and response bodies are JSON unless an operation says otherwise.

**Authentication.** Send `Authorization: Bearer <token>`. Each operation needs one role
(`x-baton-role`): `viewer` reads, `operator` also starts, signals, cancels and retries runs,
`approver` also decides approvals, `admin` may do everything. Open operations (probes, these
docs) need no token. A server started with auth disabled treats every caller as an admin.

**Errors.** Every error, whatever its status, has one shape:
`{"error": {"code": "run_not_found", "message": "...", "field": "run_id"}}`; `code` is stable and
machine-readable, `field` (when present) names the part of the request at fault.

**Pagination.** Lists that grow take `limit` and `cursor` and answer `next_cursor`: pass it back
as `cursor` for the next page; it is null on the last page. A run's history pages by event
number instead: `after` and `limit` in, `next_after` out.

**Request ids.** Every response carries `X-Request-Id`: the caller's own, when it sent a sane
one (letters, digits, `._:-`, at most 128), or one the server made. Quote it in a bug report:
the server's log names it.
"""


def package_version() -> str:
    try:
        return importlib.metadata.version("baton-orchestrator")
    except importlib.metadata.PackageNotFoundError:  # running from a bare checkout
        return "0+unknown"


def openapi_path(path: str) -> str:
    """aiohttp's `{name:regex}` placeholders as OpenAPI's `{name}`."""
    return _PLACEHOLDER.sub(r"{\1}", path)


def path_params(path: str) -> list[str]:
    return _PLACEHOLDER.findall(path)


# --- the document -----------------------------------------------------------------


def build_document(routes: Iterable[Route]) -> dict[str, Any]:
    routes = list(routes)
    refs, defs = _schemas(routes)
    paths: dict[str, dict[str, Any]] = {}
    tags: list[str] = []
    for route in routes:
        paths.setdefault(openapi_path(route.path), {})[route.method.lower()] = _operation(route, refs)
        if route.tag not in tags:
            tags.append(route.tag)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Baton",
            "version": package_version(),
            "summary": "Durable, event-driven workflow orchestration",
            "description": INTRO,
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "tags": [{"name": t, **({"description": TAGS[t]} if t in TAGS else {})} for t in tags],
        "paths": paths,
        "components": {
            "schemas": defs,
            "responses": {
                name: _error_response(description) for name, description in ERRORS.values()
            },
            "headers": {
                "RequestId": {
                    "description": "The request's id: the caller's `X-Request-Id` when sane, else one the server made",
                    "required": True,
                    "schema": {"type": "string", "pattern": _SAFE_REQUEST_ID.pattern},
                }
            },
            "securitySchemes": {
                "bearerAuth": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API token (`baton token create`); its roles decide what it may do",
                }
            },
        },
    }


def _models(routes: list[Route]) -> list[tuple[type[BaseModel], str]]:
    """Every model the table names, with the pydantic mode it is used in, once each."""
    seen: dict[tuple[type[BaseModel], str], None] = {(Error, "serialization"): None}
    for route in routes:
        if route.body is not None:
            seen[(route.body, "validation")] = None
        for value in route.responses.values():
            for part in _parts(value):
                if _is_model(part):
                    seen[(part, "serialization")] = None
    return list(seen)


def _schemas(routes: list[Route]) -> tuple[dict[tuple[type[BaseModel], str], dict[str, Any]], dict[str, Any]]:
    refs, top = models_json_schema(_models(routes), ref_template=SCHEMA_REF)
    return refs, top.get("$defs", {})


def _operation(route: Route, refs: dict[tuple[type[BaseModel], str], dict[str, Any]]) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": route.operation_id,
        "tags": [route.tag],
        "summary": route.summary,
    }
    if doc := inspect.getdoc(route.handler):
        op["description"] = doc
    if parameters := _parameters(route):
        op["parameters"] = parameters
    if route.body is not None:
        schema = refs[(route.body, "validation")]
        op["requestBody"] = {
            "required": route.body_required,
            "content": {media: {"schema": schema} for media in route.body_media},
        }
    op["responses"] = _responses(route, refs)
    op["security"] = [] if route.role is None else [{"bearerAuth": []}]
    op["x-baton-role"] = route.role
    return op


def _parameters(route: Route) -> list[dict[str, Any]]:
    declared = {p.name: p for p in route.params}
    out = []
    for name in path_params(route.path):
        param = declared.pop(name, None)
        entry: dict[str, Any] = {"name": name, "in": "path", "required": True,
                                 "schema": param.schema if param else {"type": "string"}}
        if param is not None and param.description:
            entry["description"] = param.description
        out.append(entry)
    for param in declared.values():
        entry = {"name": param.name, "in": "query", "required": param.required, "schema": param.schema}
        if param.description:
            entry["description"] = param.description
        out.append(entry)
    return out


def _responses(route: Route, refs: dict[tuple[type[BaseModel], str], dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for status, value in sorted(route.responses.items()):
        if value is None and status in ERRORS:
            out[str(status)] = {"$ref": f"#/components/responses/{ERRORS[status][0]}"}
            continue
        description = ERRORS[status][1] if status in ERRORS else _phrase(status)
        response: dict[str, Any] = {"description": description, "headers": _headers()}
        content = {}
        for part in _parts(value):
            if _is_model(part):
                content[JSON] = {"schema": refs[(part, "serialization")]}
            elif isinstance(part, str):
                content[part] = {"schema": {"type": "string"}}
            elif status >= 400:
                content[JSON] = {"schema": {"$ref": SCHEMA_REF.format(model="Error")}}
        if content:
            response["content"] = content
        out[str(status)] = response
    for status in sorted(_implied_errors(route)):
        out.setdefault(str(status), {"$ref": f"#/components/responses/{ERRORS[status][0]}"})
    return dict(sorted(out.items()))


def _implied_errors(route: Route) -> set[int]:
    statuses: set[int] = set()
    if route.role is not None:
        statuses |= {401, 403}
    if route.body is not None:
        statuses |= {400, 413, 422}
    names = path_params(route.path)
    if any(p.name not in names for p in route.params):
        statuses.add(400)
    if names:
        statuses.add(404)
    if route.path.startswith("/v1/"):
        statuses.add(503)
    return statuses


def _error_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "headers": _headers(),
        "content": {JSON: {"schema": {"$ref": SCHEMA_REF.format(model="Error")}}},
    }


def _headers() -> dict[str, Any]:
    return {REQUEST_ID: {"$ref": "#/components/headers/RequestId"}}


def _parts(value: Any) -> tuple[Any, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _is_model(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, BaseModel)


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return f"HTTP {status}"


@functools.cache
def document() -> dict[str, Any]:
    from server.api.routes import all_routes  # routes imports this module's ROUTES

    return build_document(all_routes())


@functools.cache
def document_bytes() -> bytes:
    return orjson.dumps(document())


# --- the docs page ----------------------------------------------------------------


def render_docs(doc: dict[str, Any]) -> str:
    template = _environment().from_string(
        importlib.resources.files("server.api").joinpath("docs.html").read_text(encoding="utf-8")
    )
    return template.render(**_page(doc))


@functools.cache
def docs_html() -> str:
    return render_docs(document())


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["md"] = inline_markdown
    return env


def inline_markdown(text: str) -> markupsafe.Markup:
    """`code` and **bold**, the only Markdown our descriptions use; escaped first, so safe."""
    html = str(markupsafe.escape(text))
    html = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html)
    html = re.sub(r"`([^`]+)`", r"<code>\1</code>", html)
    return markupsafe.Markup(html)


def _page(doc: dict[str, Any]) -> dict[str, Any]:
    """The document, pre-digested for the template: operations by tag, types as text."""
    schemas = doc["components"]["schemas"]
    responses = doc["components"]["responses"]
    types = functools.partial(type_html, names=set(schemas))
    groups: dict[str, list[dict[str, Any]]] = {t["name"]: [] for t in doc.get("tags", [])}
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            body = op.get("requestBody")
            groups.setdefault(op["tags"][0], []).append({
                "id": op["operationId"],
                "method": method.upper(),
                "path": path,
                "summary": op.get("summary", ""),
                "description": op.get("description", ""),
                "role": op.get("x-baton-role"),
                "parameters": [
                    {"name": p["name"], "in": p["in"], "required": p.get("required", False),
                     "type": types(p["schema"]), "description": p.get("description", "")}
                    for p in op.get("parameters", [])
                ],
                "body": None if body is None else {
                    "required": body.get("required", False),
                    "media": list(body["content"]),
                    "type": types(next(iter(body["content"].values()))["schema"]),
                },
                "responses": [_response_row(code, r, responses, types) for code, r in op["responses"].items()],
            })
    return {
        "title": doc["info"]["title"],
        "version": doc["info"]["version"],
        "intro": _paragraphs(doc["info"].get("description", "")),
        "tags": [{"name": t["name"], "description": t.get("description", ""), "operations": groups.get(t["name"], [])}
                 for t in doc.get("tags", [])],
        "schemas": [_schema_view(name, schema, types) for name, schema in sorted(schemas.items())],
    }


def _response_row(code: str, response: dict[str, Any], shared: dict[str, Any], types: Any) -> dict[str, Any]:
    if "$ref" in response:
        response = shared[response["$ref"].rsplit("/", 1)[1]]
    content = response.get("content", {})
    return {
        "code": code,
        "description": response.get("description", ""),
        "content": [{"media": media, "type": types(c.get("schema", {}))} for media, c in content.items()],
    }


def _schema_view(name: str, schema: dict[str, Any], types: Any) -> dict[str, Any]:
    required = set(schema.get("required", ()))
    return {
        "name": name,
        "description": schema.get("description", ""),
        "type": None if "properties" in schema else types(schema),
        "fields": [
            {"name": field, "type": types(sub), "required": field in required,
             "description": sub.get("description", "")}
            for field, sub in schema.get("properties", {}).items()
        ],
    }


def type_text(schema: Any) -> str:
    """A JSON Schema as a short type for people: `string | null`, `array of RunSummary`."""
    if not isinstance(schema, dict) or not schema:
        return "any JSON"
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[1]
    if "const" in schema:
        return orjson.dumps(schema["const"]).decode()
    if "enum" in schema:
        return " | ".join(orjson.dumps(v).decode() for v in schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " | ".join(type_text(s) for s in schema[key])
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(type_text({**schema, "type": k}) for k in kind)
    if kind == "array":
        return f"array of {type_text(schema.get('items', {}))}"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"object of {type_text(schema['additionalProperties'])}"
    if kind == "string" and "format" in schema:
        return f"string ({schema['format']})"
    if kind in ("integer", "number") and ("minimum" in schema or "maximum" in schema):
        return f"{kind} {schema.get('minimum', '…')}..{schema.get('maximum', '…')}"
    return kind or "any JSON"


def type_html(schema: Any, names: set[str]) -> markupsafe.Markup:
    """`type_text` with the names of component schemas linked to their section."""
    parts = re.split(r"([A-Za-z_][A-Za-z0-9_.-]*)", type_text(schema))
    html = "".join(
        f'<a class="type" href="#schema-{markupsafe.escape(part)}">{markupsafe.escape(part)}</a>' if part in names
        else str(markupsafe.escape(part))
        for part in parts
    )
    return markupsafe.Markup(html)


def _paragraphs(text: str) -> list[str]:
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


# --- routes -----------------------------------------------------------------------


async def openapi_json(request: web.Request) -> web.Response:
    """The OpenAPI 3.1 document of this API (JSON)."""
    return web.Response(body=document_bytes(), content_type=JSON)


async def docs_page(request: web.Request) -> web.Response:
    """This API's reference as one self-contained HTML page."""
    return web.Response(text=docs_html(), content_type="text/html")


class OpenAPIDocument(BaseModel):
    """An OpenAPI 3.1 document (see the OpenAPI specification for its fields)."""

    model_config = ConfigDict(extra="allow")

    openapi: str
    info: dict[str, Any]
    paths: dict[str, Any]
    components: dict[str, Any]


ROUTES: list[Route] = [
    Route("GET", "/openapi.json", openapi_json, None, "The OpenAPI 3.1 document", "docs",
          responses={200: OpenAPIDocument}),
    Route("GET", "/docs", docs_page, None, "The API reference (HTML)", "docs", responses={200: "text/html"}),
]
