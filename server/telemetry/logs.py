"""Structured logs: JSON lines for `baton serve` and `baton worker`, readable lines for
`baton dev`, with the run's identities on every line logged inside a step, and secrets
masked on every line.

Everything logs through stdlib `logging`: Baton's modules, handlers (`ctx.logger`) and
the libraries handlers call. The identities come from a context variable, not from the
logger: the executor sets it around each handler attempt (an asyncio task of its own,
so the context is per attempt and is inherited by tasks the handler starts), and a
filter on the output handler copies it onto each record. A line logged through
`logging.getLogger("boto3")` inside a step therefore carries the same `trace_id`,
`span_id`, `run_id`, ... as the handler's own lines.

Trace and span ids are the ones `server.telemetry.ids` derives (W3C Trace Context): a
step's lines carry the trace id of its run and the span id of its attempt, so a log
pipeline can join them to the spans.

Redaction runs on every record before it is formatted, and rewrites the record itself,
so other handlers (a test's capture, a second sink) see the masked text too.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar, Token
from types import MappingProxyType
from typing import Any, Literal, TextIO

import orjson

from handlers.context import Context
from server.telemetry.ids import task_span_id

LogFormat = Literal["json", "console"]

# The fields a step's lines carry, in the order a JSON line lists them.
STEP_FIELDS = ("trace_id", "span_id", "workflow", "run_id", "step_id", "task_id", "attempt")
REDACTED = "[redacted]"
HANDLER_NAME = "baton"  # the root handler `setup` installs (and replaces when called again)

# never mutated: bind() sets a new mapping, so a task keeps the one it inherited
_context: ContextVar[Mapping[str, Any]] = ContextVar("baton_log_context", default=MappingProxyType({}))


# --- the context ------------------------------------------------------------------------


def bind(**fields: Any) -> Token[Mapping[str, Any]]:
    """Add fields to every line logged from here on in this task (and tasks it starts)."""
    return _context.set({**_context.get(), **fields})


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    token = bind(**fields)
    try:
        yield
    finally:
        _context.reset(token)


def attempt_context(ctx: Context, trace_id: str) -> AbstractContextManager[None]:
    """The fields of one handler attempt (STEP_FIELDS), for the duration of the block."""
    return log_context(trace_id=trace_id, span_id=task_span_id(ctx.task_id), workflow=ctx.workflow,
                       run_id=ctx.run_id, step_id=ctx.step_id, task_id=ctx.task_id, attempt=ctx.attempt)


class ContextFilter(logging.Filter):
    """Copies the context's fields onto the record; fields the call set itself (a
    LoggerAdapter's `extra`, `extra=`) win."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = record.__dict__
        for key, value in _context.get().items():
            if key not in fields:
                fields[key] = value
        return True


# --- redaction --------------------------------------------------------------------------

# Keys whose values are credentials, in `extra` fields, in nested mappings and in
# `key=value` / `"key": "value"` text. Broad on purpose: masking a harmless value
# (`max_tokens=5`) costs less than printing a password.
_SECRET_KEY = r"(?:password|passwd|secret|token|api[_-]?key|access[_-]?key|private[_-]?key|authorization|credential|cookie|signature)"
SECRET_KEY = re.compile(_SECRET_KEY, re.I)

_TEXT = re.compile(
    rf"""
    # key: value, key=value, "key": "value" (the whole value when quoted; an auth scheme and its credential)
    (?P<key>(?<![\w-])["']?[\w.-]*?{_SECRET_KEY}[\w.-]*["']?\s*[:=]\s*)
        (?P<q>["'])?(?P<value>(?(q)[^"'\n]*|(?:(?:bearer|basic)\s+)?[^\s"',;&)}}\]]+))
    # an Authorization header value without its name (RFC 7235 token68)
    | (?P<scheme>\b(?:bearer|basic)\s+)[A-Za-z0-9._~+/-]{{8,}}=*
    # Baton API tokens (server.api.auth.new_token: bt_ + 43 urlsafe characters)
    | (?P<bt>\bbt_)[A-Za-z0-9_-]{{16,}}
    # approval links: the last segment is a signed credential (server.api.errors.SECRET_PARAMS)
    | (?P<link>/v1/approvals/)[^/\s?#"']+
    # user:password@ in a URL (a NATS or database URL)
    | (?P<userinfo>\b[a-z][a-z0-9+.-]*://[^:/\s@]+:)[^@\s/]+(?=@)
    """,
    re.I | re.X,
)
_KEEP = ("key", "scheme", "bt", "link", "userinfo")  # the group kept before the mask

# Cheap substrings (of the lowercased text) without which _TEXT cannot match: most lines
# have none of them and skip the regex, which costs ~20 us on a long line.
_HINTS = ("passw", "secret", "token", "key", "authorization", "credential", "cookie", "signature",
          "bearer", "basic", "bt_", "/v1/approvals/", "://")

# Secret values known at start-up (webhook secrets, the approval link key, NATS token):
# masked wherever they appear. Shorter values would mask ordinary words.
MIN_SECRET_CHARS = 6
_known: list[str] = []  # longest first, so a secret that contains another is masked whole


def register_secrets(*values: str | None) -> None:
    """Mask these values in every line from now on (process-wide)."""
    added = {v for v in values if v and len(v) >= MIN_SECRET_CHARS} - set(_known)
    if added:
        _known[:] = sorted([*_known, *added], key=len, reverse=True)


def _mask(m: re.Match[str]) -> str:
    for group in _KEEP:
        kept = m.group(group)
        if kept is not None:
            return kept + (m.group("q") or "") + REDACTED if group == "key" else kept + REDACTED
    return REDACTED  # unreachable: every alternative has a kept group


def redact(text: str) -> str:
    """`text` with credentials replaced by [redacted]."""
    for secret in _known:
        if secret in text:
            text = text.replace(secret, REDACTED)
    lowered = text.lower()
    if any(hint in lowered for hint in _HINTS):
        return _TEXT.sub(_mask, text)
    return text


def redact_value(value: Any, depth: int = 0) -> Any:
    """A field's value with credentials masked: strings scanned, mappings and lists walked."""
    if isinstance(value, str):
        return redact(value)
    if depth > 8:  # a deep structure in a log line is a mistake already; do not walk it all
        return value
    if isinstance(value, Mapping):
        return {k: REDACTED if _secret_key(k, v) else redact_value(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(v, depth + 1) for v in value]
    return value


def _secret_key(key: Any, value: Any) -> bool:
    return value is not None and isinstance(key, str) and SECRET_KEY.search(key) is not None


# Attributes every LogRecord has: anything else on a record is an `extra` field.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_plain = logging.Formatter()


class RedactFilter(logging.Filter):
    """Masks credentials in the message, the `extra` fields and the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: the handler reports it when it formats
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        fields = record.__dict__
        for key in [k for k in fields if k not in _RECORD_ATTRS and k not in STEP_FIELDS and not k.startswith("_")]:
            fields[key] = REDACTED if _secret_key(key, fields[key]) else redact_value(fields[key])
        if record.exc_info and not record.exc_text:
            record.exc_text = _plain.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


# --- formats ----------------------------------------------------------------------------


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's context and `extra` fields: STEP_FIELDS first, in their order."""
    fields = record.__dict__
    out = {key: fields[key] for key in STEP_FIELDS if key in fields}
    for key, value in fields.items():
        if key not in _RECORD_ATTRS and key not in out and not key.startswith("_"):
            out[key] = value
    return out


def _traceback(formatter: logging.Formatter, record: logging.LogRecord) -> str | None:
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    return record.exc_text or None


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (RFC 3339, UTC), level, logger, message, the context
    and `extra` fields, then exc_info and stack_info as strings when present."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(extra_fields(record))
        if (tb := _traceback(self, record)) is not None:
            line["exc_info"] = tb
        if record.stack_info:
            line["stack_info"] = record.stack_info
        # default=str: an odd `extra` value is printed, never the reason a line is lost
        return orjson.dumps(line, default=str).decode()


# Short names for the console; trace, span and task ids are left to the JSON lines
# (the run, step and attempt say the same to a reader).
_CONSOLE_NAMES = {"run_id": "run", "step_id": "step"}
_CONSOLE_HIDDEN = frozenset({"trace_id", "span_id", "task_id"})


class ConsoleFormatter(logging.Formatter):
    """`12:00:01 INFO baton.runtime: message  workflow=orders run=... step=charge attempt=2`
    (local time), the traceback below."""

    def format(self, record: logging.LogRecord) -> str:
        text = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {record.levelname} {record.name}: {record.getMessage()}"
        fields = [f"{_CONSOLE_NAMES.get(k, k)}={_console_value(v)}"
                  for k, v in extra_fields(record).items() if k not in _CONSOLE_HIDDEN]
        if fields:
            text += "  " + " ".join(fields)
        if (tb := _traceback(self, record)) is not None:
            text += "\n" + tb
        if record.stack_info:
            text += "\n" + record.stack_info
        return text


def _console_value(value: Any) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
    if not text or any(c.isspace() for c in text):
        return orjson.dumps(text).decode()  # quoted, so the fields stay apart
    return text


# --- set-up -----------------------------------------------------------------------------


def make_handler(fmt: LogFormat, stream: TextIO | None = None) -> logging.Handler:
    """A stream handler with the context and redaction filters and the format's formatter."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactFilter())  # after the context: masks what the whole line will show
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    return handler


def setup(level: str | int, fmt: LogFormat, stream: TextIO | None = None) -> logging.Handler:
    """Route every logger to one handler on the root logger (stderr by default). Called
    again, it replaces its own handler and leaves any other one alone."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    handler = make_handler(fmt, stream)
    handler.set_name(HANDLER_NAME)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
