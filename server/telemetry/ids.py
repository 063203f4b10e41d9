"""Trace and span ids of a run, derived from Baton's own records.

Rules (W3C Trace Context, https://www.w3.org/TR/trace-context/):

* A run's trace id is the trace id of the `traceparent` its trigger carried (a NATS
  header, a webhook's or an API request's header, kept in the run's `event`), so
  the run joins the caller's trace; without one it is derived from the run id.
  Either way it follows from what is stored with the run: every process, and
  every restart, puts the run's spans in the same trace.
* Span ids are derived from what they stand for (the run attempt, the task id, the
  wait), never drawn at random: a span that is exported after a restart, by
  another process, or rebuilt by `baton trace` from history has the same id, and
  its children point at it.
* The trigger's span, when there is one, is the parent of the run span.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from typing import Any

_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_ZERO_TRACE, _ZERO_SPAN = "0" * 32, "0" * 16
# The same ids are asked for several times per step (the pump, the executor, log lines, the
# span task) and per run (each lifecycle event): each is a hash or a regex, cached here.
# Bounded: ids of finished runs fall out.
_CACHED_IDS = 8192


def parse_traceparent(value: Any) -> tuple[str, str] | None:
    """(trace id, parent span id) of a valid version-00 `traceparent`, else None."""
    if not isinstance(value, str):
        return None
    parsed = _parse(value)
    return None if parsed is None else parsed[:2]


def traceparent_sampled(value: Any) -> bool:
    """Whether a valid `traceparent` says its span was sampled (flags bit 0)."""
    parsed = _parse(value) if isinstance(value, str) else None
    return parsed is not None and parsed[2]


@lru_cache(maxsize=_CACHED_IDS)
def _parse(value: str) -> tuple[str, str, bool] | None:
    m = _TRACEPARENT.match(value.strip().lower())
    if m is None or m.group(1) == _ZERO_TRACE or m.group(2) == _ZERO_SPAN:
        return None
    return m.group(1), m.group(2), int(m.group(3), 16) & 1 == 1


def trigger_sampled(event: Any) -> bool:
    """Whether the trigger's span, from the run's stored `event`, was sampled."""
    return isinstance(event, dict) and traceparent_sampled(event.get("traceparent"))


def trigger_context(event: Any) -> tuple[str, str] | None:
    """The trigger's (trace id, span id), from the run's stored `event`."""
    if isinstance(event, dict):
        return parse_traceparent(event.get("traceparent"))
    return None


def run_trace_id(run_id: str, event: Any = None, *, follow_trigger: bool = True) -> str:
    """The trigger's trace, or (without one, or when the trigger is only linked:
    `tracing.trigger: link`) a trace of the run's own, derived from its id."""
    ctx = trigger_context(event) if follow_trigger else None
    return ctx[0] if ctx is not None else _own_trace_id(run_id)


@lru_cache(maxsize=_CACHED_IDS)
def _own_trace_id(run_id: str) -> str:
    return hashlib.sha256(run_id.encode()).hexdigest()[:32]


def span_id(*parts: Any) -> str:
    """A span id (16 hex digits, never all zero) from what the span stands for."""
    digest = hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:16]
    return digest if digest != _ZERO_SPAN else "0" * 15 + "1"


@lru_cache(maxsize=_CACHED_IDS)
def run_span_id(run_id: str, attempt: int) -> str:
    return span_id(run_id, "run", attempt)


@lru_cache(maxsize=_CACHED_IDS)
def task_span_id(task_id: str) -> str:
    """The span of one step (or compensation) attempt: task ids are unique per attempt."""
    return span_id(task_id, "task")


def traceparent(trace_id: str, span_id_: str, sampled: bool = True) -> str:
    return f"00-{trace_id}-{span_id_}-{'01' if sampled else '00'}"
