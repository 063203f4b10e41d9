"""Templates and conditions in Jinja2's sandbox."""

from __future__ import annotations

import pytest

from server.definitions.expressions import Expression, Template
from server.errors import ExpressionError

CTX = {
    "input": {"amount": 150, "sku": "A-1", "tags": ["x", "y"], "address": {"city": "Oslo"}, "empty": ""},
    "steps": {"reserve": {"output": {"id": 7}}},
}


@pytest.mark.parametrize(
    "source, expected",
    [
        ("{{ input.amount }}", 150),  # a single expression keeps its native type
        ("  {{ input.tags }}  ", ["x", "y"]),
        ("{{ input.address }}", {"city": "Oslo"}),
        ("{{ steps.reserve.output.id + 1 }}", 8),
        ("{{ none }}", None),
        ("{{ input.amount > 100 }}", True),
        ("sku={{ input.sku }}", "sku=A-1"),  # anything else renders to a string
        ("{{ input.amount }}{{ input.sku }}", "150A-1"),
        ("{% if input.amount > 100 %}big{% else %}small{% endif %}", "big"),
        ("no markers", "no markers"),
        (42, 42),
        (None, None),
        ({"order": {"sku": "{{ input.sku }}", "qty": 2}, "tags": ["{{ input.tags | length }}", "t-{{ input.tags[0] }}"]},
         {"order": {"sku": "A-1", "qty": 2}, "tags": [2, "t-x"]}),
    ],
)
def test_template_render(source, expected) -> None:
    assert Template(source).render(CTX) == expected


def test_static_template_is_marked_static() -> None:
    assert Template({"a": [1, "two"]}).static
    assert not Template({"a": [1, "{{ input.sku }}"]}).static


@pytest.mark.parametrize(
    "source, expected",
    [
        ("input.amount > 100", True),
        ("input.amount > 100 and input.sku == 'B-2'", False),
        ("'x' in input.tags", True),
        ("input.tags | length == 2", True),
        ("input.missing | default('x')", "x"),
        ("input.empty | default('x', true)", "x"),
        ("input.address.city | upper", "OSLO"),
        ("steps.reserve.output.id is defined", True),
        ("steps.pay is defined", False),
        ("[input.amount, input.sku]", [150, "A-1"]),
    ],
)
def test_expression_evaluate(source: str, expected) -> None:
    assert Expression(source).evaluate(CTX) == expected


@pytest.mark.parametrize(
    "source, missing",
    [
        ("input.amout > 100", "'dict object' has no attribute 'amout'"),
        ("steps.pay.output", "'dict object' has no attribute 'pay'"),
        ("nope", "'nope' is undefined"),
        ("[1, nope]", "'nope' is undefined"),  # undefined inside a value is caught too
    ],
)
def test_undefined_names_are_errors(source: str, missing: str) -> None:
    with pytest.raises(ExpressionError, match=missing):
        Expression(source).evaluate(CTX)


def test_undefined_in_a_string_template_is_an_error() -> None:
    with pytest.raises(ExpressionError, match="'dict object' has no attribute 'skew'"):
        Template("sku={{ input.skew }}").render(CTX)


@pytest.mark.parametrize(
    "source",
    [
        "().__class__.__bases__",
        "''.__class__.__mro__[1].__subclasses__()",
        "input.__class__",
        "cycler.__init__.__globals__",
        "input.tags.append('z')",  # immutable sandbox: no mutation of the context
        "range(10 ** 9) | list | length",
    ],
)
def test_sandbox_blocks_escapes(source: str) -> None:
    with pytest.raises(ExpressionError):
        Expression(source).evaluate(CTX)
    with pytest.raises(ExpressionError):
        Template("{{ " + source + " }}").render(CTX)
    assert CTX["input"]["tags"] == ["x", "y"]


def test_non_json_values_are_errors() -> None:
    with pytest.raises(ExpressionError, match="not a JSON value"):
        Expression("lipsum").evaluate(CTX)


@pytest.mark.parametrize("source", ["input.amount >", "x[", "a b"])
def test_bad_expression_fails_to_compile(source: str) -> None:
    with pytest.raises(ExpressionError, match="invalid expression"):
        Expression(source)


@pytest.mark.parametrize("source", ["{{ input.sku }", "{% if x %}", {"a": ["{{ }}"]}])
def test_bad_template_fails_to_compile(source) -> None:
    with pytest.raises(ExpressionError, match="invalid"):
        Template(source)


@pytest.mark.parametrize("source", ["{{ 'a' * input.n }}", "{{ [1] * input.n }}", "{{ 2 ** input.n }}", "{{ input.n * 'ab' }}"])
def test_sandbox_bounds_repetition_and_powers(source):
    from server.definitions.expressions import Template
    from server.errors import ExpressionError

    with pytest.raises(ExpressionError):
        Template(source).render({"input": {"n": 10**9}})


def test_ordinary_arithmetic_still_works():
    from server.definitions.expressions import Template

    assert Template("{{ input.n * 3 + 2 ** 3 }}").render({"input": {"n": 2}}) == 14
    assert Template("{{ '-' * 3 }}").render({}) == "---"


@pytest.mark.parametrize("source", ["{{ input['items'] | default([]) }}", "{{ input.items | default([]) }}",
                                    "{{ input.keys | default([]) }}"])
def test_missing_mapping_keys_are_undefined_never_dict_methods(source):
    from server.definitions.expressions import Template

    assert Template(source).render({"input": {}}) == []
    assert Template(source).render({"input": {"items": [1], "keys": [1]}}) == [1]


def test_missing_key_without_default_is_an_error_naming_it():
    from server.definitions.expressions import Expression
    from server.errors import ExpressionError

    with pytest.raises(ExpressionError, match="items"):
        Expression("input['items']").evaluate({"input": {}})


def test_static_template_renders_a_fresh_copy_each_time():
    from server.definitions.expressions import Template

    tpl = Template({"tags": ["a"], "opts": {"x": 1}})
    first = tpl.render({})
    first["tags"].append("mutated by a handler")
    first["opts"]["x"] = 2
    assert tpl.render({}) == {"tags": ["a"], "opts": {"x": 1}}
