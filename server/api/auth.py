"""Who is calling, and may they: bearer tokens with roles, checked by one middleware.

Rules:
* Every route declares the role it needs (`Route.role` in routes.py); `None` marks the
  few open ones: probes, `/metrics`, webhooks (they check their own signatures) and
  approval links (the signed token in the URL is the credential).
* Roles grant: viewer reads; operator = viewer + start, cancel, retry, signal;
  approver = viewer + decide approvals; admin = everything. Operators do not approve
  (whoever starts a deploy should not be the one who waves it through).
* The config holds SHA-256 hashes of tokens, never tokens. Tokens are 256-bit random
  strings, so a fast hash is enough (a slow password hash protects guessable
  secrets; these are not guessable), and lookup by hash compares no secret bytes.
* With auth disabled (explicitly; `baton dev` does it) every caller is `anonymous`
  with every role.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from server.errors import Forbidden, Unauthorized
from server.settings import ROLES, Auth

GRANTS: dict[str, frozenset[str]] = {
    "viewer": frozenset({"viewer"}),
    "operator": frozenset({"operator", "viewer"}),
    "approver": frozenset({"approver", "viewer"}),
    "admin": frozenset(ROLES),
}
TOKEN_PREFIX = "bt_"  # recognisable in a leaked-secret scan


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    roles: frozenset[str]  # what the token's roles grant, expanded
    authenticated: bool = True

    def may(self, role: str) -> bool:
        return role in self.roles


ANONYMOUS = Principal("anonymous", frozenset(ROLES), authenticated=False)
PRINCIPAL = web.RequestKey("principal", Principal)


class TokenRequired(Unauthorized):
    """401 for the API: the response tells the client which scheme to use (RFC 6750)."""

    challenge = 'Bearer realm="baton"'


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Authenticator:
    def __init__(self, auth: Auth) -> None:
        self.enabled = auth.enabled
        self._by_hash = {
            t.sha256: Principal(t.name, frozenset().union(*(GRANTS[r] for r in t.roles))) for t in auth.tokens
        }

    def identify(self, authorization: str | None) -> Principal | None:
        """The caller of a request with this Authorization header; None without one.
        Unauthorized for a header that is not a known bearer token."""
        if not self.enabled:
            return ANONYMOUS
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise TokenRequired("the Authorization header must be `Bearer <token>`")
        principal = self._by_hash.get(hash_token(token.strip()))
        if principal is None:
            raise TokenRequired("unknown or revoked API token")
        return principal


def require(principal: Principal | None, role: str, what: str) -> Principal:
    """The principal, if it may act as `role`; else 401 (nobody) or 403 (the wrong role)."""
    if principal is None:
        raise TokenRequired(f"{what} needs an API token with the {role} role: send `Authorization: Bearer <token>`")
    if not principal.may(role):
        held = ", ".join(sorted(principal.roles)) or "none"
        raise Forbidden(f"{what} needs the {role} role; token {principal.name!r} has: {held}", field="role")
    return principal


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def middleware(auth: Auth, role_of: Callable[[web.Request], tuple[str | None, str] | None]):
    """`role_of(request)` -> (role or None for an open route, description), or None when no
    route matched (the router's 404/405 then answers)."""
    authenticator = Authenticator(auth)

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        needed = role_of(request)
        if needed is None:
            return await handler(request)
        role, what = needed
        header = request.headers.get("Authorization")
        if role is None:  # open: a token, if sent and valid, still names the caller
            try:
                principal = authenticator.identify(header)
            except Unauthorized:
                principal = None
        else:
            principal = authenticator.identify(header)
            if principal is not None:  # known before the role check: the audit log names who was refused
                request[PRINCIPAL] = principal
            principal = require(principal, role, what)
        if principal is not None:
            request[PRINCIPAL] = principal
        return await handler(request)

    return authenticate


def caller(request: web.Request) -> Principal | None:
    """The authenticated caller of this request (ANONYMOUS with auth off), or None."""
    return request.get(PRINCIPAL)


def caller_name(request: web.Request) -> str | None:
    principal = caller(request)
    return principal.name if principal is not None else None
