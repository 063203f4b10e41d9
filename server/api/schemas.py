"""What a request may say: body models (unknown fields are errors) and query parsers.

A body that is not JSON is a 400 naming the parse position; JSON that does not fit
the model is a 422 naming the field (`a.b[0]`, the loader's style), so a caller
never has to guess which part of the request was wrong.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Annotated, Any, TypeVar

import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from server.engine.state import CANCELLED, COMPENSATED, COMPENSATING, FAILED, QUEUED, RUNNING, SUCCEEDED
from server.errors import BadJson, BadRequest, InvalidInput

RUN_STATUSES = (QUEUED, RUNNING, COMPENSATING, SUCCEEDED, FAILED, COMPENSATED, CANCELLED)
MAX_LIST_LIMIT = 500
DEFAULT_LIST_LIMIT = 50
# History pages: big enough that most runs fit in one, small enough to bound a response.
MAX_HISTORY_LIMIT = 10_000
DEFAULT_HISTORY_LIMIT = 1000
# A long poll holds a connection; one minute stays under common proxy idle timeouts.
MAX_WAIT_S = 60.0
DEFAULT_WAIT_S = 30.0


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StartRun(_Body):
    input: Any = None
    workflow_id: str | None = Field(None, min_length=1, max_length=256)
    # Workflow files allow `version: 3`; so does the API.
    version: Annotated[
        str | None, BeforeValidator(lambda v: str(v) if isinstance(v, int) and not isinstance(v, bool) else v)
    ] = None


class SendSignal(_Body):
    data: Any = None


class CancelRun(_Body):
    reason: str = Field("cancelled", min_length=1, max_length=1000)


M = TypeVar("M", bound=BaseModel)


def parse_body(model: type[M], raw: bytes, *, optional: bool = False) -> M:
    """An empty body is `{}` when the body is optional, else an error."""
    if not raw.strip():
        if optional:
            return model()
        raise BadJson("the request body is empty; expected a JSON object")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadJson(f"invalid JSON at line {exc.lineno} column {exc.colno} (char {exc.pos}): {exc.msg}") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = dotted(errors[0]["loc"]) or None
        message = "; ".join(f"{dotted(e['loc']) or 'body'}: {_message(e)}" for e in errors)
        raise InvalidInput(message, field=first) from None


def dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _message(error: dict[str, Any]) -> str:
    if error["type"] == "model_type":
        return "expected a JSON object"
    return error["msg"]


# --- query parameters -------------------------------------------------------------


def query_int(query: Any, name: str, default: int, low: int, high: int) -> int:
    text = query.get(name)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, got {text!r}", field=name) from None
    if not low <= value <= high:
        raise BadRequest(f"{name} must be between {low} and {high}, got {value}", field=name)
    return value


def query_timestamp(query: Any, name: str) -> float | None:
    """Unix seconds from RFC 3339 (`2024-05-01T12:00:00Z`) or a plain number of seconds."""
    text = query.get(name)
    if text is None or text == "":
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise BadRequest(f"{name} must be a finite number of seconds, got {text!r}", field=name)
        return seconds
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise BadRequest(
            f"{name} must be an RFC 3339 timestamp (2024-05-01T12:00:00Z) or unix seconds, got {text!r}", field=name
        ) from None
    if moment.tzinfo is None:  # RFC 3339 requires an offset; read a bare time as UTC rather than local
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def query_status(query: Any) -> str | None:
    status = query.get("status") or None
    if status is not None and status not in RUN_STATUSES:
        raise BadRequest(f"unknown status {status!r}; expected one of {', '.join(RUN_STATUSES)}", field="status")
    return status


def query_wait_s(query: Any) -> float:
    text = query.get("timeout")
    if text is None or text == "":
        return DEFAULT_WAIT_S
    try:
        value = float(text)
    except ValueError:
        raise BadRequest(f"timeout must be a number of seconds, got {text!r}", field="timeout") from None
    if not value >= 0:  # also catches nan
        raise BadRequest(f"timeout must not be negative, got {text!r}", field="timeout")
    return min(value, MAX_WAIT_S)
