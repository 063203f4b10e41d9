"""CloudEvents 1.0 over NATS: reading events in, writing Baton's events out.

Three shapes are accepted on a trigger subject (CloudEvents spec 1.0 and its
NATS protocol binding):

* structured mode: the body is a JSON object with `specversion`, `id`,
  `source`, `type` and usually `data`;
* binary mode: the attributes are `ce-*` headers (`ce-specversion`, `ce-id`, ...)
  and the body is the data (JSON if it parses, else text);
* plain JSON: any JSON body, which becomes `event.data`.

An event's dedupe key is the `Nats-Msg-Id` header when the publisher set one,
else the CloudEvents `source` + `id`, else the message's place in the stream
(which still dedupes a redelivery).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import orjson

SPECVERSION = "1.0"
REQUIRED = ("id", "source", "type")
SOURCE = "baton"  # the `source` of the events Baton publishes


class EventError(ValueError):
    """The message is not an event Baton can read (not JSON, CloudEvent missing attributes)."""


def parse_event(subject: str, headers: dict[str, str] | None, body: bytes, *, stream_seq: int | None = None
                ) -> tuple[dict[str, Any], str]:
    """The event as templates see it, and its dedupe key."""
    headers = headers or {}
    lowered = {k.lower(): v for k, v in headers.items()}
    if "ce-specversion" in lowered:
        event = _binary(lowered, body)
    else:
        data = _json(body)
        if isinstance(data, dict) and "specversion" in data:
            event = _structured(data)
        else:
            event = {"specversion": SPECVERSION, "id": lowered.get("nats-msg-id"), "source": "nats",
                     "type": subject, "data": data}
    event["nats_subject"] = subject
    if "traceparent" in lowered:
        event["traceparent"] = lowered["traceparent"]
    if msg_id := lowered.get("nats-msg-id"):
        key = f"msg:{msg_id}"
    elif event.get("id") is not None and event.get("source") != "nats":
        key = f"ce:{event['source']}:{event['id']}"
    elif stream_seq is not None:
        key = f"seq:{subject}:{stream_seq}"
    else:
        raise EventError("the event has no id: set a Nats-Msg-Id header or a CloudEvents id")
    return event, key


def _json(body: bytes) -> Any:
    if not body.strip():
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise EventError(f"the body is not JSON ({exc}); send JSON or a CloudEvent") from None


def _structured(data: dict[str, Any]) -> dict[str, Any]:
    _check(data)
    return dict(data)


def _binary(headers: dict[str, str], body: bytes) -> dict[str, Any]:
    event: dict[str, Any] = {k[3:]: v for k, v in headers.items() if k.startswith("ce-")}
    _check(event)
    content_type = headers.get("content-type", "application/json")
    event["datacontenttype"] = content_type
    if "json" in content_type:
        event["data"] = _json(body)
    else:
        event["data"] = body.decode("utf-8", errors="replace")
    return event


def _check(event: dict[str, Any]) -> None:
    if str(event.get("specversion")) != SPECVERSION:
        raise EventError(f"unsupported CloudEvents specversion {event.get('specversion')!r} (Baton reads {SPECVERSION})")
    missing = [a for a in REQUIRED if not event.get(a)]
    if missing:
        raise EventError(f"the CloudEvent lacks required attribute(s): {', '.join(missing)}")


def make_event(type_: str, id_: str, subject: str | None, data: Any, at: float) -> bytes:
    """A structured-mode CloudEvent from Baton."""
    event = {
        "specversion": SPECVERSION, "id": id_, "source": SOURCE, "type": type_,
        "time": datetime.fromtimestamp(at, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "datacontenttype": "application/json", "data": data,
    }
    if subject is not None:
        event["subject"] = subject
    return orjson.dumps(event)
