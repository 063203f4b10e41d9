"""The `http.request` handler: one HTTP call through a shared aiohttp session.

Failures are sorted once, here: a status or network failure that may pass on its
own (5xx, 408, 429, refused connection, timeout) raises `HttpError` and is retried;
any other 4xx or a malformed request raises `NonRetryableError(type="HttpError")`.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import weakref
from collections.abc import Callable
from typing import Any

import aiohttp

from handlers.context import Context, NonRetryableError
from handlers.registry import REGISTRY, handler

HeaderInjector = Callable[[Context, dict[str, str]], None]

# Extension point: each injector may add to the outgoing headers of every request,
# e.g. W3C Trace Context (`traceparent`) from the step's span. Runs after the
# step's own headers, so an injector sees (and may override) them.
def trace_context(ctx: Context, headers: dict[str, str]) -> None:
    """W3C Trace Context: the attempt's span is the parent of what the request starts,
    unless the step set a `traceparent` of its own."""
    if ctx.traceparent and not any(name.lower() == "traceparent" for name in headers):
        headers["traceparent"] = ctx.traceparent


header_injectors: list[HeaderInjector] = [trace_context]

# RFC 9110 §15.5.9: 408 means the server gave up waiting for the request; a repeat may succeed.
RETRYABLE_4XX = frozenset({408, 429})
ERROR_BODY_CHARS = 500  # enough of an error body to diagnose, small enough to store per attempt


class HttpError(Exception):
    """A retryable HTTP failure; `status` is None when no response arrived."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


# One session per event loop: a session is bound to the loop it was created on.
_sessions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession] = weakref.WeakKeyDictionary()


def _session() -> aiohttp.ClientSession:
    loop = asyncio.get_running_loop()
    session = _sessions.get(loop)
    if session is None or session.closed:
        session = _sessions[loop] = aiohttp.ClientSession()
    return session


@REGISTRY.on_shutdown
async def close_session() -> None:
    """Close the current loop's shared session (a shutdown hook of REGISTRY)."""
    session = _sessions.pop(asyncio.get_running_loop(), None)
    if session is not None:
        await session.close()


@handler("http.request")
async def request(
    ctx: Context,
    url: str,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
    json: Any = None,
    body: str | None = None,
    timeout_s: float = 30.0,
    expect: list[int] | None = None,
) -> dict[str, Any]:
    if json is not None and body is not None:
        raise NonRetryableError("give either json or body, not both", type="HttpError")
    out_headers = dict(headers or {})
    for inject in header_injectors:
        inject(ctx, out_headers)
    target = f"{method} {url}"
    try:
        async with _session().request(
            method,
            url,
            headers=out_headers,
            params=params,
            json=json,
            data=body,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            result = {"status": resp.status, "headers": _headers(resp), "body": await _body(resp)}
    except TimeoutError:  # aiohttp's timeouts subclass TimeoutError too
        raise HttpError(None, f"{target}: no response within {timeout_s}s") from None
    except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
        raise NonRetryableError(f"{target}: invalid URL: {exc}", type="HttpError") from exc
    except aiohttp.ClientError as exc:
        raise HttpError(None, f"{target}: {type(exc).__name__}: {exc}") from exc
    _check_status(target, result, expect)
    return result


def _check_status(target: str, result: dict[str, Any], expect: list[int] | None) -> None:
    status: int = result["status"]
    ok = (status in expect) if expect is not None else (200 <= status < 400)
    if ok:
        return
    body = result["body"]
    snippet = (body if isinstance(body, str) else jsonlib.dumps(body))[:ERROR_BODY_CHARS]
    message = f"{target}: HTTP {status}: {snippet}" if snippet else f"{target}: HTTP {status}"
    if status >= 500 or status in RETRYABLE_4XX:
        raise HttpError(status, message)
    raise NonRetryableError(message, type="HttpError", details={"status": status, "body": snippet})


def _headers(resp: aiohttp.ClientResponse) -> dict[str, str]:
    # Lower-case names so templates need not guess the server's casing; repeated
    # headers are joined with ", " as RFC 9110 §5.3 allows.
    out: dict[str, str] = {}
    for name, value in resp.headers.items():
        key = name.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


async def _body(resp: aiohttp.ClientResponse) -> Any:
    text = await resp.text(errors="replace")  # a binary body must not fail the step
    if resp.content_type == "application/json" or resp.content_type.endswith("+json"):
        try:
            return jsonlib.loads(text) if text else None
        except ValueError:
            return text  # a server that mislabels its body; the text is still useful
    return text
