"""Approvals over HTTP: the link's page and its decision, the list, and the approver's route.

* `GET /v1/approvals/{token}` and `POST /v1/approvals/{token}` are open: the signed
  token in the link is the credential (server/runtime/approvals.py). GET only shows
  (chat apps and mail scanners fetch links to preview them; a GET must never decide).
  The page is HTML unless the client asks for JSON (`Accept: application/json`); a
  form post from the page gets an HTML answer, a JSON post a JSON one.
* Who decided, as history records it: the name of a valid bearer token sent along
  (via "token"), else the link holder (via "link", with whatever name they typed:
  not verified, and history says so).
* `POST /v1/runs/{run_id}/approval` is for approvers with a token (the CLI): the
  step's `approvers` list applies there (a token's name or one of its roles must be
  listed; admin always may). The link is not checked against it: it is the
  credential the approvers were sent.
* The page escapes everything (Jinja2 autoescape): messages carry workflow input.
  It loads nothing from elsewhere, runs no script, and its headers forbid framing,
  caching and leaking the link through Referer.
"""

from __future__ import annotations

import importlib.resources
from typing import Any, Literal

import jinja2
from aiohttp import web
from pydantic import BaseModel, Field, ValidationError

from server.api import schemas
from server.api.audit import note
from server.api.auth import PRINCIPAL, Principal, caller
from server.api.errors import status_for
from server.api.routes import CURSOR, LIMIT, json_response, _orch
from server.api.table import Param, Route
from server.api.views import RunSummary, Timestamp
from server.errors import BadRequest, BatonError, Conflict, Forbidden, InvalidInput, UnsupportedMediaType
from server.store.base import APPROVAL_STATUSES

MAX_COMMENT_CHARS = 2000
MAX_NAME_CHARS = 100
LINK_ACTOR = "approval-link"  # the audit log's actor for a decision made through a link
FORMS = ("application/x-www-form-urlencoded",)  # what the page's form sends
# No script, nothing from elsewhere, no framing (clickjacking a button), forms post here only.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "Referrer-Policy": "no-referrer",  # the token is in the URL
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}

_TEMPLATE = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(
    importlib.resources.files("server.api").joinpath("approval.html").read_text(encoding="utf-8")
)


# --- request and response models ------------------------------------------------------------


class LinkDecision(schemas._Body):
    decision: Literal["approve", "reject"]
    comment: str | None = Field(None, max_length=MAX_COMMENT_CHARS)
    name: str | None = Field(None, max_length=MAX_NAME_CHARS,
                             description="Who you are, as you like to be named in history (not verified)")


class RunDecision(schemas._Body):
    decision: Literal["approve", "reject"]
    comment: str | None = Field(None, max_length=MAX_COMMENT_CHARS)
    step: str | None = Field(None, description="The step (id or key) to decide, when the run waits on several")


class ApprovalView(BaseModel):
    id: str = Field(description="<run_id>:<step key>:<attempt>")
    run_id: str
    workflow: str
    version: str
    workflow_id: str | None
    key: str
    step_id: str
    status: Literal[APPROVAL_STATUSES]  # type: ignore[valid-type]
    message: str
    approvers: list[str]
    started_by: str | None
    on_reject: Literal["fail", "continue"] | None
    requested_at: Timestamp
    expires_at: Timestamp | None = Field(description="The step's approval timeout, if any")
    link_expires_at: Timestamp | None
    decided_at: Timestamp | None
    decided_by: str | None
    decided_via: Literal["token", "link", "api", "timeout"] | None
    comment: str | None
    link: str | None = Field(description="The link that decides it: for approvers, while pending")


class ApprovalPage(BaseModel):
    approvals: list[ApprovalView]
    next_cursor: str | None


class Decided(BaseModel):
    approval: ApprovalView
    run: RunSummary


# --- the list and the approver's route ------------------------------------------------------


async def list_approvals(request: web.Request) -> web.Response:
    q = request.query
    status = q.get("status") or "pending"
    if status not in (*APPROVAL_STATUSES, "all"):
        raise BadRequest(f"unknown status {status!r}; expected one of {', '.join(APPROVAL_STATUSES)} or all",
                         field="status")
    principal = caller(request)
    items, next_cursor = await _orch(request).list_approvals(
        status=None if status == "all" else status, run_id=q.get("run_id") or None,
        limit=schemas.query_int(q, "limit", schemas.DEFAULT_LIST_LIMIT, 1, schemas.MAX_LIST_LIMIT),
        cursor=q.get("cursor") or None, links=principal is not None and principal.may("approver"),
    )
    return json_response({"approvals": items, "next_cursor": next_cursor})


async def decide_run_approval(request: web.Request) -> web.Response:
    body = schemas.parse_body(RunDecision, await request.read())
    run_id = request.match_info["run_id"]
    orch = _orch(request)
    pending, _ = await orch.list_approvals(status="pending", run_id=run_id, limit=schemas.MAX_LIST_LIMIT)
    if body.step is not None:
        pending = [a for a in pending if body.step in (a["key"], a["step_id"])]
    if not pending:
        await orch.get_run(run_id)  # 404 for a run that does not exist
        what = f"step {body.step!r} of run {run_id}" if body.step else f"run {run_id}"
        raise Conflict(f"no approval of {what} is pending", field="step" if body.step else None)
    if len(pending) > 1:
        keys = ", ".join(a["key"] for a in pending)
        raise BadRequest(f"run {run_id} waits for {len(pending)} approvals ({keys}): name one with `step`", field="step")
    approval = pending[0]
    note(request, approval=approval["id"], run_id=run_id)  # refused or not, the entry names what was asked
    principal = caller(request)
    _check_approvers(principal, approval)
    by = {"name": principal.name, "via": "token" if principal.authenticated else "api"}
    run = await orch.decide_approval(approval["id"], body.decision, comment=body.comment, by=by)
    return json_response({"approval": await orch.get_approval(approval["id"]), "run": run})


def _check_approvers(principal: Principal, approval: dict[str, Any]) -> None:
    approvers = approval["approvers"]
    if not approvers or principal.may("admin") or principal.name in approvers or principal.roles & set(approvers):
        return
    raise Forbidden(f"step {approval['key']!r} of run {approval['run_id']} may be decided by "
                    f"{', '.join(approvers)}; token {principal.name!r} is none of them", field="approvers")


# --- the link -------------------------------------------------------------------------------


async def approval_page(request: web.Request) -> web.StreamResponse:
    as_json = _wants_json(request)
    try:
        approval = await _orch(request).approval_for_link(request.match_info["token"])
    except BatonError as exc:
        if as_json:
            raise
        return _error_page(exc)
    if as_json:
        return json_response(approval)
    return _page(f"Approval requested: {approval['workflow']}", approval)


async def decide_by_link(request: web.Request) -> web.StreamResponse:
    form = request.content_type in FORMS
    try:
        orch = _orch(request)
        approval = await orch.approval_for_link(request.match_info["token"])  # the credential, before the content
        note(request, approval=approval["id"], run_id=approval["run_id"])
        body = await _link_decision(request, form)
        by = _link_holder(request, body.name)
        run = await orch.decide_approval(approval["id"], body.decision, comment=body.comment, by=by)
    except BatonError as exc:
        if not form:
            raise
        return _error_page(exc)
    if by["via"] == "link":  # the audit log names who acted: here, whoever held the link
        request[PRINCIPAL] = Principal(LINK_ACTOR, frozenset(), authenticated=False)
    decided = await orch.get_approval(approval["id"])
    if form:
        title = "Approved: the run goes on" if body.decision == "approve" else "Rejected"
        return _page(title, decided, done=True)
    return json_response({"approval": decided, "run": run})


async def _link_decision(request: web.Request, form: bool) -> LinkDecision:
    if not form:
        if request.content_type not in ("application/json", "application/octet-stream", ""):
            raise UnsupportedMediaType(f"send JSON or a form, not {request.content_type}")
        return schemas.parse_body(LinkDecision, await request.read())
    fields = await request.post()
    data = {k: str(v) for k, v in fields.items() if k in ("decision", "comment", "name") and str(v).strip()}
    try:
        return LinkDecision.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise InvalidInput(f"{schemas.dotted(first['loc'])}: {first['msg']}", field=schemas.dotted(first["loc"])) from None


def _link_holder(request: web.Request, name: str | None) -> dict[str, Any]:
    principal = caller(request)
    if principal is not None and principal.authenticated:  # a valid API token came along: it names the caller
        return {"name": principal.name, "via": "token"}
    return {"name": name.strip() if name and name.strip() else None, "via": "link"}


def _wants_json(request: web.Request) -> bool:
    accept = request.headers.get("Accept", "")
    return "application/json" in accept and "text/html" not in accept


def _page(title: str, approval: dict[str, Any], *, done: bool = False, status: int = 200) -> web.Response:
    html = _TEMPLATE.render(title=title, a=approval, done=done, error=None, max_comment=MAX_COMMENT_CHARS,
                            max_name=MAX_NAME_CHARS)
    return web.Response(text=html, content_type="text/html", status=status, headers=PAGE_HEADERS)


def _error_page(exc: BatonError) -> web.Response:
    status = status_for(exc)
    titles = {401: "This link is not valid", 404: "No such approval", 409: "Already decided",
              410: "This link has expired"}
    html = _TEMPLATE.render(title=titles.get(status, "This request cannot be decided"), a=None, done=False,
                            error=exc.message, max_comment=MAX_COMMENT_CHARS, max_name=MAX_NAME_CHARS)
    return web.Response(text=html, content_type="text/html", status=status, headers=PAGE_HEADERS)


TOKEN = Param("token", {"type": "string"}, "The signed token of an approval link (the link's last segment)")
STATUS = Param("status", {"type": "string", "enum": [*APPROVAL_STATUSES, "all"], "default": "pending"},
               "Only approvals in this status")
RUN = Param("run_id", {"type": "string"}, "Only approvals of this run")

# the link's errors are pages for a browser (a form post, or a GET without Accept: application/json)
PAGE_ERROR = (None, "text/html")

ROUTES: list[Route] = [
    Route("GET", "/v1/approvals", list_approvals, "viewer",
          "List approval requests, newest first (links only for approvers)", "approvals",
          responses={200: ApprovalPage}, params=(STATUS, RUN, LIMIT, CURSOR)),
    Route("GET", "/v1/approvals/{token}", approval_page, None,
          "The approval page of a link (HTML; JSON with Accept: application/json)", "approvals",
          responses={200: ("text/html", ApprovalView), 401: PAGE_ERROR, 404: PAGE_ERROR, 410: PAGE_ERROR,
                     503: PAGE_ERROR}, params=(TOKEN,)),
    Route("POST", "/v1/approvals/{token}", decide_by_link, None,
          "Approve or reject through a link (JSON, or the page's form)", "approvals",
          body=LinkDecision, body_media=("application/json", "application/x-www-form-urlencoded"),
          responses={200: (Decided, "text/html"), 401: PAGE_ERROR, 404: PAGE_ERROR, 409: PAGE_ERROR,
                     410: PAGE_ERROR, 422: PAGE_ERROR, 503: PAGE_ERROR, 415: None},
          params=(TOKEN,)),
    Route("POST", "/v1/runs/{run_id}/approval", decide_run_approval, "approver",
          "Approve or reject a run's pending approval (the step's approvers apply)", "approvals",
          body=RunDecision, responses={200: Decided, 409: None, 410: None}),
]
