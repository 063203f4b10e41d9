"""The `nats.publish` and `nats.request` handlers, over the server's own NATS connection.

The server binds its connection with `use(nc)` when it starts and `use(None)` when
it stops; a step that runs while nothing is bound (NATS disabled) fails at once
with a NonRetryableError saying so.

Data out: a string is sent as its UTF-8 bytes, bytes as they are, None as an empty
body, any other value as JSON. Headers: the step's own, then `header_injectors`
(shared with `http.request`, so W3C Trace Context reaches NATS calls too).

Failures are sorted here: what may pass on its own (no reply in time, no responders,
no JetStream ack, the connection down) raises `NatsError` / `NatsRequestError` and
is retried under the step's policy; a bad subject, header or payload (a retry would
fail the same way) raises `NonRetryableError(type="NatsError")`.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import re
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from handlers.context import Context, NonRetryableError
from handlers import http
from handlers.registry import handler

DEFAULT_TIMEOUT_S = 5.0  # a reply or a JetStream ack within 5 s, or the attempt is retried
MSG_ID_HEADER = "Nats-Msg-Id"  # JetStream dedupes a repeated id within the stream's duplicate window

_WHITESPACE = re.compile(r"\s")
# NATS headers follow HTTP's wire form: printable ASCII names without ':', values without CR/LF.
_HEADER_NAME = re.compile(r"^[!-9;-~]+$")


class NatsError(Exception):
    """A retryable NATS failure: the connection is down, or no ack arrived in time."""


class NatsRequestError(NatsError):
    """A retryable request failure: no reply within the timeout, or no responders."""


class _Binding:
    nc: Client | None = None
    js: JetStreamContext | None = None


_bound = _Binding()


def use(nc: Client | None) -> None:
    """Bind the connection the handlers use (the server does this); None unbinds.

    One binding per process: the server owns one NATS connection.
    """
    _bound.nc = nc
    _bound.js = nc.jetstream() if nc is not None else None


def _client() -> Client:
    nc = _bound.nc
    if nc is None:
        raise NonRetryableError(
            "NATS is not configured: this server runs with NATS disabled (nats.enabled: false), "
            "so nats.publish and nats.request cannot run",
            type="NatsError",
        )
    return nc


@handler("nats.publish")
async def publish(
    ctx: Context,
    subject: str,
    data: Any = None,
    headers: dict[str, Any] | None = None,
    jetstream: bool = False,
    msg_id: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """Publish one message. Core NATS: returns once the server has it (a flush), not
    when anyone received it. JetStream (`jetstream: true`): returns the stream's ack;
    the message id is `msg_id` or one per step, so a retried attempt is stored once."""
    nc = _client()
    _check_subject(subject)
    _check_timeout(timeout_s)
    payload = _encode(data)
    if not isinstance(jetstream, bool):
        raise NonRetryableError(f"jetstream must be true or false, got {jetstream!r}", type="NatsError")
    out_headers = _headers(ctx, headers)
    if msg_id is not None:  # on a core publish too: a stream capturing the subject dedupes it
        out_headers[MSG_ID_HEADER] = _check_msg_id(msg_id)
    if jetstream:
        out_headers.setdefault(MSG_ID_HEADER, step_msg_id(ctx))
        return await _publish_jetstream(subject, payload, out_headers, timeout_s)
    try:
        await nc.publish(subject, payload, headers=out_headers or None)
        await _server_has_it(nc, timeout_s)
    except nats.errors.MaxPayloadError:
        raise _too_large(subject, payload, nc) from None
    except TimeoutError:  # nats-py's FlushTimeoutError is one too
        raise NatsError(f"publish to {subject}: the server did not confirm within {timeout_s}s") from None
    except nats.errors.Error as exc:
        raise NatsError(f"publish to {subject}: {_describe(exc)}") from exc
    return {"subject": subject}


@handler("nats.request")
async def request(
    ctx: Context,
    subject: str,
    data: Any = None,
    headers: dict[str, Any] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """Send a request and wait for the first reply: {"data": JSON or text, "headers": {...}}."""
    nc = _client()
    _check_subject(subject)
    _check_timeout(timeout_s)
    payload = _encode(data)
    out_headers = _headers(ctx, headers)
    try:
        reply = await nc.request(subject, payload, timeout=timeout_s, headers=out_headers or None)
    except nats.errors.NoRespondersError:
        raise NatsRequestError(f"request to {subject}: no responders") from None
    except nats.errors.TimeoutError:
        raise NatsRequestError(f"request to {subject}: no reply within {timeout_s}s") from None
    except nats.errors.MaxPayloadError:
        raise _too_large(subject, payload, nc) from None
    except nats.errors.Error as exc:
        raise NatsRequestError(f"request to {subject}: {_describe(exc)}") from exc
    return {"data": _decode(reply.data), "headers": dict(reply.headers or {})}


async def _server_has_it(nc: Client, timeout_s: float) -> None:
    """Return once the server has processed what was published. One flush() is not
    enough with nats-py 2.16: its PING goes straight to the socket, ahead of the PUB
    still queued for the client's flusher task; the second PING follows the PUB."""
    async with asyncio.timeout(timeout_s):
        await nc.flush(timeout=timeout_s)
        await nc.flush(timeout=timeout_s)


def step_msg_id(ctx: Context) -> str:
    """One message id per step, the same for every attempt: `<run_id>:<step_id>`
    (`:compensate` added for the step's compensation). The attempt's own
    idempotency key would not do: a retry has a new one, so an attempt that
    published but lost the ack would be published again by the next."""
    return f"{ctx.run_id}:{ctx.step_id}:compensate" if ctx.compensation else f"{ctx.run_id}:{ctx.step_id}"


async def _publish_jetstream(subject: str, payload: bytes, headers: dict[str, str], timeout_s: float) -> dict[str, Any]:
    assert _bound.js is not None and _bound.nc is not None
    try:
        ack = await _bound.js.publish(subject, payload, timeout=timeout_s, headers=headers)
    except nats.js.errors.NoStreamResponseError:
        # retryable: a stream may be on its way (created by a service that is starting)
        raise NatsError(f"publish to {subject}: no JetStream stream captures this subject") from None
    except nats.js.errors.APIError as exc:
        message = f"publish to {subject}: JetStream refused: {exc.description or exc} (code {exc.code})"
        if exc.code is not None and 400 <= exc.code < 500:
            raise NonRetryableError(message, type="NatsError", details={"code": exc.code, "err_code": exc.err_code})
        raise NatsError(message) from exc
    except nats.errors.MaxPayloadError:
        raise _too_large(subject, payload, _bound.nc) from None
    except nats.errors.TimeoutError:
        raise NatsError(f"publish to {subject}: no JetStream ack within {timeout_s}s") from None
    except nats.errors.Error as exc:
        raise NatsError(f"publish to {subject}: {_describe(exc)}") from exc
    return {"subject": subject, "stream": ack.stream, "seq": ack.seq, "duplicate": bool(ack.duplicate)}


# --- arguments -----------------------------------------------------------------------


def _check_subject(subject: Any) -> None:
    """A subject to send to: dot-separated tokens, none empty, no whitespace, no wildcard token."""
    tokens = subject.split(".") if isinstance(subject, str) else [""]
    if any(not token or token in ("*", ">") or _WHITESPACE.search(token) for token in tokens):
        raise NonRetryableError(
            f"invalid subject {subject!r}: expected dot-separated tokens without spaces or wildcards (* or >)",
            type="NatsError",
        )


def _check_timeout(timeout_s: Any) -> None:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise NonRetryableError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}", type="NatsError")


def _check_msg_id(msg_id: Any) -> str:
    if not isinstance(msg_id, str) or not msg_id or "\r" in msg_id or "\n" in msg_id:
        raise NonRetryableError(f"msg_id must be a non-empty single-line string, got {msg_id!r}", type="NatsError")
    return msg_id


def _headers(ctx: Context, headers: Any) -> dict[str, str]:
    if headers is None:
        headers = {}
    if not isinstance(headers, dict):
        raise NonRetryableError(f"headers must be a mapping of names to values, got {type(headers).__name__}",
                                type="NatsError")
    out: dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise NonRetryableError(f"invalid header name {name!r}: printable ASCII without ':' or spaces",
                                    type="NatsError")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise NonRetryableError(f"header {name!r} must be a string or a number, got {type(value).__name__}",
                                    type="NatsError")
        text = str(value)
        if "\r" in text or "\n" in text:
            raise NonRetryableError(f"header {name!r} must be a single line", type="NatsError")
        out[name] = text
    for inject in http.header_injectors:  # looked up per call: the list may be replaced (tests do)
        inject(ctx, out)
    return out


def _encode(data: Any) -> bytes:
    if data is None:
        return b""
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    try:
        return jsonlib.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise NonRetryableError(f"data cannot be sent as JSON: {exc}", type="NatsError") from None


def _decode(data: bytes) -> Any:
    """A reply body as JSON when it parses, else as text (invalid UTF-8 replaced); empty is None."""
    if not data:
        return None
    text = data.decode(errors="replace")
    try:
        return jsonlib.loads(text)
    except ValueError:
        return text


def _too_large(subject: str, payload: bytes, nc: Client | None) -> NonRetryableError:
    limit = nc.max_payload if nc is not None else "?"
    return NonRetryableError(f"message to {subject} is {len(payload)} bytes; the server accepts at most {limit}",
                             type="NatsError")


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
