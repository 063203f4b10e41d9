"""The route table's entry: one endpoint, its role, and what it takes and gives.

Feature modules (webhooks, approvals, audit, ...) each keep a `ROUTES` list of these;
`server.api.routes.all_routes()` joins them, the router, the auth middleware and the
OpenAPI document all read that one list.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class Param:
    """A query parameter, for the OpenAPI document (parsing stays in the handler).

    A Param whose name is a `{placeholder}` of the route's path describes that path
    parameter instead (its schema; path parameters are strings otherwise)."""

    name: str
    schema: dict[str, Any]
    description: str = ""
    required: bool = False


@dataclass(frozen=True, slots=True)
class Route:
    """One endpoint: what it does, who may call it, and what it takes and gives.

    `role` is the role the caller needs (server/api/auth.py); None marks an open
    route. `body` is the request model, sent as one of `body_media` (JSON unless the
    route says otherwise); `body_required=False` when an empty body means the model's
    defaults. `responses` maps a status to the response model (a media type string for
    non-JSON bodies, None for an empty or error body, a tuple of these when the client
    may choose, e.g. `(HistoryPage, "text/csv")`, or `(None, "text/html")` for an
    error that a page for people may answer as HTML). The usual errors (auth, bad
    body or query, unknown path resource, 503) are added for each route. The OpenAPI
    document is built from this table and nothing else (server/api/openapi.py)."""

    method: str
    path: str
    handler: Handler
    role: str | None
    summary: str
    tag: str
    body: type[BaseModel] | None = None
    responses: Mapping[int, Any] = field(default_factory=dict)
    params: tuple[Param, ...] = ()
    body_required: bool = True
    body_media: tuple[str, ...] = ("application/json",)

    @property
    def operation_id(self) -> str:
        return self.handler.__name__
