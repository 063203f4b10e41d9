"""Triggers, compiled: subject matching and the templates of event and webhook triggers.

Matching follows NATS subject rules: tokens split on `.`, `*` matches exactly one
token, a final `>` matches one or more.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.definitions.expressions import Expression, Template
from server.definitions.models import EventTrigger, WebhookTrigger
from server.errors import ExpressionError


class TriggerError(Exception):
    def __init__(self, part: str, message: str) -> None:
        super().__init__(message)
        self.part, self.message = part, message


class _Templates:
    """What event and webhook triggers share: a filter, the input and the workflow_id,
    all seeing the trigger's `event`."""

    filter: Expression | None
    input: Template | None  # None: the run's input is the event's data
    workflow_id: Template | None

    def accepts(self, event: dict[str, Any]) -> bool:
        """The filter's verdict; ExpressionError if it cannot be evaluated."""
        return self.filter is None or bool(self.filter.evaluate({"event": event}))

    def render_input(self, event: dict[str, Any]) -> Any:
        return event.get("data") if self.input is None else self.input.render({"event": event})

    def render_workflow_id(self, event: dict[str, Any]) -> str | None:
        if self.workflow_id is None:
            return None
        value = self.workflow_id.render({"event": event})
        return None if value is None or value == "" else str(value)


@dataclass(frozen=True)
class CompiledEventTrigger(_Templates):
    subject: str
    filter: Expression | None
    input: Template | None
    workflow_id: Template | None

    def matches(self, subject: str) -> bool:
        return subject_matches(self.subject, subject)


@dataclass(frozen=True)
class CompiledWebhookTrigger(_Templates):
    path: str
    filter: Expression | None
    input: Template | None
    workflow_id: Template | None


def compile_event_trigger(trigger: EventTrigger) -> CompiledEventTrigger:
    return CompiledEventTrigger(trigger.subject, **_compile_templates(trigger))


def compile_webhook_trigger(trigger: WebhookTrigger) -> CompiledWebhookTrigger:
    return CompiledWebhookTrigger(trigger.path, **_compile_templates(trigger))


def _compile_templates(trigger: EventTrigger | WebhookTrigger) -> dict[str, Any]:
    parts: dict[str, Any] = {}
    for part, source, kind in (("filter", trigger.filter, Expression), ("input", trigger.input, Template),
                               ("workflow_id", trigger.workflow_id, Template)):
        try:
            parts[part] = None if source is None else kind(source)
        except ExpressionError as exc:
            raise TriggerError(part, exc.message) from None
    return parts


def subject_matches(pattern: str, subject: str) -> bool:
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(have) == len(want)


def subject_covers(general: str, specific: str) -> bool:
    """Does every subject that `specific` matches also match `general`?"""
    want, have = general.split("."), specific.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or have[i] == ">" or (token != "*" and token != have[i]) or (token != "*" and have[i] == "*"):
            return False
    return len(have) == len(want)


def minimal_subjects(subjects: list[str]) -> list[str]:
    """The subjects left once those covered by another are dropped (a stream refuses overlaps)."""
    unique = sorted(set(subjects))
    return [s for s in unique if not any(o != s and subject_covers(o, s) for o in unique)]
