"""OTLP trace payloads, written straight in the protobuf wire format.

Why not the SDK's encoder: it takes a `ReadableSpan` and builds opentelemetry-proto
messages field by field, in Python (about 40 us a span, most of what tracing cost a
run). Baton's spans are plain records whose shape is known; writing their bytes
directly costs a few microseconds, and attribute pairs that repeat (the workflow,
the step, the outcome) are encoded once and reused.

The messages and field numbers are those of opentelemetry-proto, OTLP 1.x (stable):
`opentelemetry/proto/trace/v1/trace.proto`, `common/v1/common.proto`,
`resource/v1/resource.proto` and `collector/trace/v1/trace_service.proto`; the wire
format is https://protobuf.dev/programming-guides/encoding/. Fields are written in
field-number order, defaults left out, as protobuf's own serializer does: the
tests compare these bytes with what the SDK's encoder makes of the same spans.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# opentelemetry.proto.trace.v1.Span.SpanKind
KIND_INTERNAL, KIND_SERVER, KIND_CLIENT, KIND_PRODUCER, KIND_CONSUMER = 1, 2, 3, 4, 5
# opentelemetry.proto.trace.v1.Status.StatusCode
STATUS_UNSET, STATUS_OK, STATUS_ERROR = 0, 1, 2
# opentelemetry.proto.trace.v1.SpanFlags: what the SDK's encoder sets (bit 8: is_remote is known;
# bit 9: the parent is remote)
FLAG_HAS_IS_REMOTE, FLAG_IS_REMOTE = 0x100, 0x200

# Bounded: a pair seen once (a run id) must not make the cache grow for ever.
MAX_CACHED_PAIRS = 4096

_SMALL = [bytes((n,)) for n in range(128)]
_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")
_U32 = struct.Struct("<I")
_MASK64 = (1 << 64) - 1
_TIMES = struct.Struct("<BQBQ")  # start and end, each a fixed64 field
_STATUS_FIELDS = {code: b"\x7a" + _SMALL[len(body)] + body for code, body in
                  ((STATUS_UNSET, b""), (STATUS_OK, b"\x18\x01"), (STATUS_ERROR, b"\x18\x02"))}  # without a message
_FLAGS_FIELDS: dict[int, bytes] = {}
_SCALARS = frozenset({str, bool, int, float})
_pairs: dict[tuple[bytes, str, Any, type], bytes] = {}


def varint(n: int) -> bytes:
    if n < 128:
        return _SMALL[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2): tag, length, payload."""
    n = len(payload)
    return tag + (_SMALL[n] if n < 128 else varint(n)) + payload


def any_value(value: Any) -> bytes | None:
    """An AnyValue message, or None for a value OTLP cannot carry (None, an object)."""
    if isinstance(value, str):
        return _field(b"\x0a", value.encode())
    if isinstance(value, bool):  # before int: a bool is an int
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + varint(value & _MASK64)  # int64, two's complement as protobuf sends it
    if isinstance(value, float):
        return b"\x21" + _F64.pack(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Sequence):
        items = [any_value(v) for v in value]
        return _field(b"\x2a", b"".join(_field(b"\x0a", v) for v in items if v is not None))
    return None


def key_value(key: str, value: Any) -> bytes | None:
    """A KeyValue message, or None when the value cannot be sent (it is left out)."""
    encoded_value = any_value(value)
    if encoded_value is None:
        return None
    return _field(b"\x0a", key.encode()) + _field(b"\x12", encoded_value)


def _attributes(tag: bytes, attributes: Mapping[str, Any], out: list[bytes]) -> None:
    """Each attribute as a KeyValue field `tag`, appended to `out`. Scalar pairs are cached
    with their tag: a span's attributes repeat (the workflow, the step, the outcome, the run
    on every span of it), and a cached pair costs a dict look-up instead of four encodings."""
    for key, value in attributes.items():
        kind = value.__class__
        if kind in _SCALARS:
            # the type too: True, 1 and 1.0 are equal keys. Builtin types, strings and bytes
            # are atomic: the garbage collector soon stops tracking the tuple.
            pair = (tag, key, value, kind)
            encoded = _pairs.get(pair)
            if encoded is None:
                if len(_pairs) >= MAX_CACHED_PAIRS:
                    _pairs.clear()
                encoded = _pairs[pair] = _field(tag, key_value(key, value))
            out.append(encoded)
        else:
            kv = key_value(key, value)
            if kv is not None:
                out.append(_field(tag, kv))


def span(trace_id: bytes, span_id: bytes, parent_id: bytes | None, name: str, kind: int, start_ns: int,
         end_ns: int, attributes: Mapping[str, Any], events: Iterable[tuple[str, int, Mapping[str, Any]]] = (),
         status: int = STATUS_UNSET, message: str | None = None, flags: int = FLAG_HAS_IS_REMOTE,
         trace_state: str = "") -> bytes:
    """A Span message. Ids are raw bytes (16 and 8); times are ns since the epoch; events
    are (name, time_ns, attributes); attributes whose values OTLP cannot carry are left out."""
    parts = [b"\x0a\x10", trace_id, b"\x12\x08", span_id]
    if trace_state:
        parts.append(_field(b"\x1a", trace_state.encode()))
    if parent_id:
        parts += (b"\x22\x08", parent_id)
    if name:  # proto3: an empty string, a zero, is not sent
        parts.append(_field(b"\x2a", name.encode()))
    parts += (b"\x30", _SMALL[kind])
    if start_ns and end_ns:
        parts.append(_TIMES.pack(0x39, start_ns, 0x41, end_ns))
    else:
        if start_ns:
            parts += (b"\x39", _U64.pack(start_ns))
        if end_ns:
            parts += (b"\x41", _U64.pack(end_ns))
    _attributes(b"\x4a", attributes, parts)
    for event_name, at_ns, event_attributes in events:
        body = [b"\x09", _U64.pack(at_ns)] if at_ns else []
        if event_name:
            body.append(_field(b"\x12", event_name.encode()))
        _attributes(b"\x1a", event_attributes, body)
        parts.append(_field(b"\x5a", b"".join(body)))
    if message:
        parts.append(_field(b"\x7a", _field(b"\x12", message.encode()) + (b"\x18" + _SMALL[status] if status else b"")))
    else:
        parts.append(_STATUS_FIELDS[status])
    flags_field = _FLAGS_FIELDS.get(flags)
    if flags_field is None:
        flags_field = _FLAGS_FIELDS[flags] = b"\x85\x01" + _U32.pack(flags)
    parts.append(flags_field)
    return b"".join(parts)


def scope(name: str, version: str | None = None) -> bytes:
    """An InstrumentationScope message."""
    return _field(b"\x0a", name.encode()) + (_field(b"\x12", version.encode()) if version else b"")


def resource(attributes: Mapping[str, Any]) -> bytes:
    """A Resource message."""
    out: list[bytes] = []
    _attributes(b"\x0a", attributes, out)
    return b"".join(out)


def scope_span(span_body: bytes) -> bytes:
    """A Span message as a field of ScopeSpans (`spans`), for export_request."""
    return _field(b"\x12", span_body)


def export_request(resource_body: bytes, scopes: Iterable[tuple[bytes, Sequence[bytes]]],
                   resource_schema_url: str = "") -> bytes:
    """An ExportTraceServiceRequest: one resource, its spans grouped by scope, each span
    framed already (scope_span)."""
    body = [_field(b"\x0a", resource_body)]
    for scope_body, spans in scopes:
        body.append(_field(b"\x12", b"".join([_field(b"\x0a", scope_body), *spans])))
    if resource_schema_url:
        body.append(_field(b"\x1a", resource_schema_url.encode()))
    return _field(b"\x0a", b"".join(body))
