"""Templates and conditions, evaluated in Jinja2's sandbox (never `eval`).

* A condition or items expression is Jinja2 expression syntax: `input.amount > 100`.
* A template is any JSON-like value. Strings in it may contain `{{ ... }}`; a string
  that is exactly one `{{ expression }}` yields the expression's native value (a
  number, list or object), any other string renders to a string.
* Undefined names are errors (StrictUndefined), so a typo fails loudly instead of
  rendering an empty string.

Rendering is pure: the sandbox has no clock, no I/O and no randomness, which is
what lets the engine render step inputs inside `decide`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson
from jinja2 import StrictUndefined, TemplateError, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.errors import ExpressionError

# Sizes an expression may build with `*` and `**`: beyond these a template is an attack
# (or a bug), not a workflow. Jinja's sandbox does not bound them itself.
MAX_REPEAT_LEN = 100_000
MAX_POWER_EXPONENT = 1_000
MIN_INT, MAX_INT = -(2**63), 2**63 - 1  # what orjson writes and SQLite keeps


class _Environment(ImmutableSandboxedEnvironment):
    """For mappings, data is all there is: `input.items` and `input['items']` are the
    `items` key, and a missing key is undefined (so `| default(...)` applies), never a
    dict method. Multiplication and powers are bounded so a template cannot hang the
    engine."""

    intercepted_binops = frozenset({"*", "**"})

    def getitem(self, obj: Any, argument: Any) -> Any:
        if isinstance(obj, Mapping):
            try:
                return obj[argument]
            except (KeyError, TypeError):
                return self.undefined(obj=obj, name=argument)
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(right, (int, float)) and abs(right) > MAX_POWER_EXPONENT:
                raise ExpressionError(f"exponent {right} is larger than {MAX_POWER_EXPONENT}")
            return left ** right
        for seq, count in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
                if len(seq) * count > MAX_REPEAT_LEN:
                    raise ExpressionError(f"repetition would build {len(seq) * count} items (limit {MAX_REPEAT_LEN})")
        return left * right

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, Mapping):
            return self.getitem(obj, attribute)
        return super().getattr(obj, attribute)


_ENV = _Environment(undefined=StrictUndefined, autoescape=False)
_SINGLE = re.compile(r"^\s*\{\{(?P<expr>(?:(?!\}\}).)*)\}\}\s*$", re.DOTALL)
_MARKERS = ("{{", "{%", "{#")
# Jinja parses recursively and compiles to Python: brackets nested a few hundred deep
# exhaust its stack (RecursionError) or Python's parser (SyntaxError: too many nested
# parentheses). Both mean "this template is invalid", like a TemplateError.
_COMPILE_ERRORS = (TemplateError, RecursionError, SyntaxError)


def _native(value: Any) -> Any:
    """Make sure an expression's value is JSON-like; an undefined name is an error."""
    if isinstance(value, int) and not isinstance(value, bool) and not MIN_INT <= value <= MAX_INT:
        # JSON as Baton stores it (orjson, SQLite) holds 64-bit integers: caught here, it
        # fails the step that rendered it, not the commit of every run decided with it
        raise ExpressionError(f"expression produced the integer {value}, which does not fit in 64 bits")
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Undefined):
        value._fail_with_undefined_error()  # raises UndefinedError naming the missing name
    if isinstance(value, Mapping):
        return {str(k): _native(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_native(v) for v in value]
    raise ExpressionError(f"expression produced a {type(value).__name__}, not a JSON value")


class Expression:
    """A compiled expression: `Expression("input.x > 1").evaluate(ctx)`."""

    __slots__ = ("source", "_fn")

    def __init__(self, source: str) -> None:
        self.source = source
        try:
            self._fn = _ENV.compile_expression(source, undefined_to_none=False)
        except _COMPILE_ERRORS as exc:
            raise ExpressionError(f"invalid expression {source!r}: {exc}") from None

    def evaluate(self, ctx: Mapping[str, Any]) -> Any:
        try:
            return _native(self._fn(**ctx))
        except Exception as exc:  # Jinja raises many kinds; all mean "this did not evaluate"
            raise ExpressionError(f"{self.source!r}: {exc}") from None


class _StringTemplate:
    __slots__ = ("source", "_tpl")

    def __init__(self, source: str) -> None:
        self.source = source
        try:
            self._tpl = _ENV.from_string(source)
        except _COMPILE_ERRORS as exc:
            raise ExpressionError(f"invalid template {source!r}: {exc}") from None

    def evaluate(self, ctx: Mapping[str, Any]) -> str:
        try:
            return self._tpl.render(**ctx)
        except Exception as exc:
            raise ExpressionError(f"{self.source!r}: {exc}") from None


class Template:
    """A compiled JSON-like template: `Template({"a": "{{ input.a }}"}).render(ctx)`."""

    __slots__ = ("source", "_compiled", "static")

    def __init__(self, source: Any) -> None:
        self.source = source
        self._compiled = self._compile(source)
        self.static = not _has_markers(source)

    @classmethod
    def _compile(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not any(m in value for m in _MARKERS):
                return value
            single = _SINGLE.match(value)
            if single and "{%" not in value:
                return Expression(single.group("expr").strip())
            return _StringTemplate(value)
        if isinstance(value, Mapping):
            return {str(k): cls._compile(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [cls._compile(v) for v in value]
        return value

    def render(self, ctx: Mapping[str, Any]) -> Any:
        if self.static:
            # a fresh copy: a handler that changes its input must not change the next run's
            if isinstance(self.source, (dict, list)):
                return orjson.loads(orjson.dumps(self.source))
            return self.source
        return _render(self._compiled, ctx)


def _render(node: Any, ctx: Mapping[str, Any]) -> Any:
    if isinstance(node, (Expression, _StringTemplate)):
        return node.evaluate(ctx)
    if isinstance(node, dict):
        return {k: _render(v, ctx) for k, v in node.items()}
    if isinstance(node, list):
        return [_render(v, ctx) for v in node]
    return node


def _has_markers(value: Any) -> bool:
    if isinstance(value, str):
        return any(m in value for m in _MARKERS)
    if isinstance(value, Mapping):
        return any(_has_markers(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_markers(v) for v in value)
    return False
