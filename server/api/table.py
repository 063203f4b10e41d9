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
    """A query parameter, for the OpenAPI document (parsing stays in the handler)."""

    name: str
    schema: dict[str, Any]
    description: str = ""
    required: bool = False


@dataclass(frozen=True, slots=True)
class Route:
    """One endpoint: what it does, who may call it, and what it takes and gives.

    `role` is the role the caller needs (server/api/auth.py); None marks an open
    route. `body` is the request model; `responses` maps a status to the response
    model (a media type string for non-JSON bodies, None for an empty or error body).
    The OpenAPI document is built from this table and nothing else."""

    method: str
    path: str
    handler: Handler
    role: str | None
    summary: str
    tag: str
    body: type[BaseModel] | None = None
    responses: Mapping[int, Any] = field(default_factory=dict)
    params: tuple[Param, ...] = ()

    @property
    def operation_id(self) -> str:
        return self.handler.__name__
