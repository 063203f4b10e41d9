"""Loading workflow files: every problem is `file:line: field: message`, with the right line."""

from __future__ import annotations

import textwrap

import pytest
from jsonschema import Draft202012Validator
from ruamel.yaml import YAML

from server.definitions.catalog import Catalog
from server.definitions.loader import LoadedWorkflow, load_paths, load_workflow_text, workflow_json_schema
from server.definitions.models import DEFAULT_HEARTBEAT_S, parse_duration
from server.errors import DefinitionError

HANDLERS = {"inventory.reserve", "inventory.release", "payments.charge", "shipping.ship"}

GOOD = """\
name: order-saga
version: 3
description: reserve, pay, ship
input_schema:
  type: object
  required: [sku]
  properties:
    sku: {type: string}
timeout: 1h
defaults:
  retry: {max_attempts: 3, initial_delay: 1s}
steps:
  - id: reserve
    task: inventory.reserve
    input: {sku: "{{ input.sku }}"}
    compensate: {task: inventory.release, input: {sku: "{{ input.sku }}"}}
  - id: approve
    wait_for_signal: {signal: approve, timeout: 4h}
  - id: pay
    task: payments.charge
    when: "input.amount > 0"
  - id: fan
    parallel:
      left: [{id: ship, task: shipping.ship}]
      right: [{id: nap, sleep: 250ms}]
"""

# The same workflow: other key order, flow vs block style, comments, quoting, explicit defaults.
GOOD_REFORMATTED = """\
# reformatted by hand
version: 3
name: "order-saga"
steps:
  - {id: reserve, task: inventory.reserve, input: {sku: "{{ input.sku }}"},
     compensate: {input: {sku: "{{ input.sku }}"}, task: inventory.release}}
  - id: approve
    wait_for_signal:
      timeout: 4h
      signal: approve
      on_timeout: fail
  - id: pay
    when: "input.amount > 0"
    task: payments.charge
  - id: fan
    parallel:
      left:
        - id: ship
          task: shipping.ship
      right:
        - {sleep: 0.25, id: nap}
timeout: 3600
defaults: {retry: {initial_delay: 1, max_attempts: 3}}
input_schema: {properties: {sku: {type: string}}, required: [sku], type: object}
description: reserve, pay, ship
"""


def problems_of(text: str, known_handlers=None) -> list[str]:
    with pytest.raises(DefinitionError) as info:
        load_workflow_text(textwrap.dedent(text), "wf.yaml", known_handlers)
    return info.value.problems


def test_good_file_loads() -> None:
    loaded = load_workflow_text(GOOD, "good.yaml", HANDLERS)
    assert isinstance(loaded, LoadedWorkflow)
    assert (loaded.model.name, loaded.model.version) == ("order-saga", "3")
    assert loaded.compiled.def_hash == loaded.def_hash
    assert loaded.compiled.handlers == HANDLERS
    assert (loaded.path, loaded.source) == ("good.yaml", GOOD)
    assert len(loaded.def_hash) == 64


def test_hash_ignores_formatting() -> None:
    assert load_workflow_text(GOOD_REFORMATTED).def_hash == load_workflow_text(GOOD).def_hash


@pytest.mark.parametrize(
    "old, new",
    [
        ("version: 3", "version: 4"),
        ("timeout: 1h", "timeout: 2h"),
        ('when: "input.amount > 0"', 'when: "input.amount > 1"'),
        ("sleep: 250ms", "sleep: 251ms"),
    ],
)
def test_hash_changes_with_content(old: str, new: str) -> None:
    assert old in GOOD
    assert load_workflow_text(GOOD.replace(old, new)).def_hash != load_workflow_text(GOOD).def_hash


# One case per kind of problem: (yaml, expected problems). Line numbers count from 1.
ERROR_CASES = {
    "yaml syntax": (
        """\
        name: x
        steps: [
          {id: a, task: t
        """,
        ["wf.yaml:4: <root>: invalid YAML: while parsing a flow mapping, expected ',' or '}', but got '<stream end>'"],
    ),
    "yaml duplicate key": (
        """\
        name: x
        steps: []
        name: y
        """,
        [
            "wf.yaml:3: <root>: invalid YAML: while constructing a mapping, "
            'found duplicate key "name" with value "y" (original value: "x")'
        ],
    ),
    "control character": (
        "name: x\nsteps:\n  - id: a\x07\n",
        ["wf.yaml:3: <root>: invalid YAML: special characters are not allowed"],
    ),
    "not a mapping": (
        """\
        - id: a
          task: t
        """,
        ["wf.yaml:1: <root>: a workflow must be a mapping, found a list"],
    ),
    "empty document": ("# nothing here\n", ["wf.yaml:1: <root>: a workflow must be a mapping, found an empty document"]),
    "unknown field": (
        """\
        name: x
        steps:
          - id: a
            task: t
            retires: 3
        """,
        ["wf.yaml:5: steps[0].retires: unknown field"],
    ),
    "wrong type": (
        """\
        name: x
        steps:
          - id: a
            task: t
            retry:
              max_attempts: lots
        """,
        ["wf.yaml:6: steps[0].retry.max_attempts: Input should be a valid integer, unable to parse string as an integer"],
    ),
    "bad duration": (
        """\
        name: x
        timeout: 5x
        steps:
          - {id: a, sleep: 1}
        """,
        ["wf.yaml:2: timeout: invalid duration '5x': use e.g. 30s, 5m, 1h30m, 250ms or plain seconds"],
    ),
    "step without a kind": (
        """\
        name: x
        steps:
          - id: a
            task: t
          - id: b
            description: does nothing
        """,
        [
            "wf.yaml:5: steps[1]: a step must have exactly one of task, wait_for_signal, sleep, wait_until, "
            "parallel, map, workflow (found: none)"
        ],
    ),
    "step with two kinds": (
        """\
        name: x
        steps:
          - id: a
            task: t
            sleep: 5s
        """,
        [
            "wf.yaml:3: steps[0]: a step must have exactly one of task, wait_for_signal, sleep, wait_until, "
            "parallel, map, workflow (found: task, sleep)"
        ],
    ),
    "missing required field": (
        """\
        name: x
        steps:
          - id: a
            task: t
          - task: t
            description: no id
        """,
        ["wf.yaml:5: steps[1].id: Field required"],
    ),
    "missing field of a nested mapping": (
        """\
        name: x
        concurrency:
          key: "{{ input.tenant }}"
        steps:
          - {id: a, task: t}
        """,
        ["wf.yaml:3: concurrency.limit: Field required"],
    ),
    "duplicate step id": (
        """\
        name: x
        steps:
          - id: a
            task: t
          - id: p
            parallel:
              left:
                - id: a
                  task: t
        """,
        ["wf.yaml:8: steps[1].parallel.left[0].id: duplicate step id 'a' (first used at steps.0)"],
    ),
    "unknown need": (
        """\
        name: x
        steps:
          - id: a
            task: t
          - id: b
            task: t
            needs: [a, c]
        """,
        [
            "wf.yaml:7: steps[1].needs[1]: unknown step 'c': needs must name a step of the same list "
            "in this workflow"
        ],
    ),
    "cyclic needs": (
        """\
        name: x
        steps:
          - id: a
            task: t
            needs: [b]
          - id: b
            task: t
        """,
        ["wf.yaml:6: steps[1].needs: cycle in needs: a -> b -> a"]  # b needs a implicitly,
    ),
    "bad template": (
        """\
        name: x
        steps:
          - id: a
            task: t
            input:
              sku: "{{ input.sku }"
        """,
        ["wf.yaml:5: steps[0].input: invalid template '{{ input.sku }': unexpected '}'"],
    ),
    "bad expression": (
        """\
        name: x
        steps:
          - id: a
            task: t
            when: "input.amount >"
        """,
        ["wf.yaml:5: steps[0].when: invalid expression 'input.amount >': unexpected 'end of template'"],
    ),
    "invalid input_schema": (
        """\
        name: x
        input_schema:
          type: object
          required: sku
        steps:
          - {id: a, task: inventory.reserve}
        """,
        ["wf.yaml:4: input_schema.required: not a valid JSON Schema: 'sku' is not of type 'array'"],
    ),
}


@pytest.mark.parametrize("text, expected", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_error(text: str, expected: list[str]) -> None:
    assert problems_of(text) == expected


def test_unknown_handlers_at_their_task_lines() -> None:
    text = """\
        name: x
        steps:
          - id: reserve
            task: inventory.reserv
            compensate:
              task: inventory.unreserve
          - id: ship
            task: shipping.ship
        """
    assert problems_of(text, HANDLERS) == [
        "wf.yaml:4: steps[0].task: unknown handler 'inventory.reserv' "
        "(known: inventory.reserve, inventory.release, payments.charge, shipping.ship)",
        "wf.yaml:6: steps[0].compensate.task: unknown handler 'inventory.unreserve' "
        "(known: inventory.reserve, inventory.release, payments.charge, shipping.ship)",
    ]


def test_unknown_handlers_in_nested_steps_and_many_known() -> None:
    text = """\
        name: x
        steps:
          - id: each
            map:
              items: input.skus
              steps:
                - id: one
                  task: nope
        """
    known = {f"h{i}" for i in range(10)}
    assert problems_of(text, known) == [
        "wf.yaml:8: steps[0].map.steps[0].task: unknown handler 'nope' (known: h0, h1, h2, h3, h4, ...)"
    ]


def test_all_problems_are_collected_in_line_order() -> None:
    text = """\
        name: x
        timeout: forever
        input_schema: {type: 5}
        steps:
          - id: a
            task: t
            retry: {max_attempts: 0}
          - id: b
        """
    assert problems_of(text) == [
        "wf.yaml:2: timeout: invalid duration 'forever': use e.g. 30s, 5m, 1h30m, 250ms or plain seconds",
        "wf.yaml:3: input_schema.type: not a valid JSON Schema: 5 is not valid under any of the given schemas",
        "wf.yaml:7: steps[0].retry.max_attempts: Input should be greater than or equal to 1",
        "wf.yaml:8: steps[1]: a step must have exactly one of task, wait_for_signal, sleep, wait_until, "
        "parallel, map, workflow (found: none)",
    ]


def test_graph_and_handler_problems_are_collected_together() -> None:
    text = """\
        name: x
        steps:
          - id: a
            task: nope
          - id: a
            task: shipping.ship
            needs: [zz]
        """
    assert problems_of(text, HANDLERS) == [
        "wf.yaml:4: steps[0].task: unknown handler 'nope' "
        "(known: inventory.release, inventory.reserve, payments.charge, shipping.ship)",
        "wf.yaml:5: steps[1].id: duplicate step id 'a' (first used at steps.0)",
        "wf.yaml:7: steps[1].needs[0]: unknown step 'zz': needs must name a step of the same list in this workflow",
    ]


def test_timestamps_stay_strings() -> None:
    text = "name: x\nsteps:\n  - id: a\n    wait_until: 2024-05-01T10:00:00Z\n"
    assert load_workflow_text(text).model.steps[0].wait_until == "2024-05-01T10:00:00Z"


def test_load_paths(tmp_path) -> None:
    (tmp_path / "a_good.yaml").write_text(GOOD)
    (tmp_path / "b_bad.yml").write_text("name: bad\nsteps: []\n")
    (tmp_path / "c_same.yaml").write_text(GOOD_REFORMATTED)  # same content: not a conflict
    (tmp_path / "d_conflict.yaml").write_text("# edited\n" + GOOD.replace("timeout: 1h", "timeout: 2h"))
    (tmp_path / "notes.txt").write_text("not a workflow")
    missing = tmp_path / "missing.yaml"

    loaded, problems = load_paths([tmp_path, missing])

    assert [wf.path for wf in loaded] == [str(tmp_path / "a_good.yaml")]
    assert problems == [
        f"{tmp_path / 'b_bad.yml'}:2: steps: List should have at least 1 item after validation, not 0",
        f"{tmp_path / 'd_conflict.yaml'}:2: name: workflow 'order-saga' version '3' is also defined, "
        f"differently, in {tmp_path / 'a_good.yaml'}",
        f"{missing}: no such file or directory",
    ]


def test_json_schema_is_valid_and_accepts_a_workflow() -> None:
    schema = workflow_json_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] and schema["description"]
    validator = Draft202012Validator(schema)
    assert list(validator.iter_errors(YAML(typ="safe").load(GOOD))) == []
    assert list(validator.iter_errors(YAML(typ="safe").load(GOOD_REFORMATTED))) == []
    assert not validator.is_valid({"name": "x", "steps": [{"id": "a", "tsak": "t"}]})


DURATIONS_OK = [("30s", 30.0), ("5m", 300.0), ("1h30m", 5400.0), ("250ms", 0.25), ("1d", 86400.0),
                ("45", 45.0), ("2.5", 2.5), (45, 45.0), (2.5, 2.5), ("1h 30m", 5400.0)]


@pytest.mark.parametrize("text, seconds", DURATIONS_OK)
def test_parse_duration(text, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5x", "-1", "", True, "1h 30q", None, "nan", "inf", -3])
def test_parse_duration_rejects(text) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def _wf(name: str, version: str) -> LoadedWorkflow:
    return load_workflow_text(f"name: {name}\nversion: '{version}'\nsteps: [{{id: a, sleep: 1}}]\n")


def test_catalog() -> None:
    catalog = Catalog()
    for name, version in [("b", "9"), ("b", "10"), ("b", "2"), ("a", "alpha"), ("a", "beta")]:
        catalog.add(_wf(name, version))
    catalog.add(_wf("b", "10"))  # the same definition again

    assert len(catalog) == 5
    assert catalog.names() == ["a", "b"]
    assert [w.model.version for w in catalog.versions("b")] == ["2", "9", "10"]
    assert catalog.latest("b").model.version == "10"
    assert catalog.latest("a").model.version == "beta"
    assert catalog.latest("zz") is None
    first = catalog.versions("b")[0]
    assert catalog.by_hash(first.def_hash) is first
    assert catalog.by_hash("0" * 64) is None


def test_catalog_from_paths(tmp_path) -> None:
    (tmp_path / "good.yaml").write_text(GOOD)
    catalog, problems = Catalog.from_paths([tmp_path], HANDLERS)
    assert problems == []
    assert catalog.latest("order-saga").path == str(tmp_path / "good.yaml")


def test_queue_steps_need_no_local_handler_and_get_a_default_heartbeat():
    text = textwrap.dedent("""\
        name: q
        steps:
          - id: a
            task: gpu.render
            queue: gpu
            compensate: {task: gpu.cleanup}
          - id: b
            task: gpu.render
            queue: gpu
            heartbeat: 5s
          - id: c
            task: inventory.reserve
        """)
    loaded = load_workflow_text(text, "q.yaml", known_handlers=HANDLERS)
    nodes = loaded.compiled.nodes
    assert (nodes["a"].heartbeat_s, nodes["b"].heartbeat_s, nodes["c"].heartbeat_s) == (DEFAULT_HEARTBEAT_S, 5.0, None)
    assert loaded.compiled.handlers == {"inventory.reserve"}  # the server needs only its own


@pytest.mark.parametrize("step, problem", [
    ("    task: t\n    heartbeat: 5s\n", "steps[0]: heartbeat belongs to steps with a queue (remote workers send heartbeats)"),
    ("    task: t\n    queue: gpu\n    heartbeat: 0\n", "steps[0].heartbeat: Input should be greater than 0"),
    ("    task: t\n    queue: gpu.big\n", "steps[0].queue: String should match pattern '^[A-Za-z0-9_-]{1,64}$'"),
])
def test_queue_and_heartbeat_rules(step, problem):
    with pytest.raises(DefinitionError) as info:
        load_workflow_text("name: q\nsteps:\n  - id: a\n" + step, "q.yaml")
    assert [p.split(": ", 1)[1] for p in info.value.problems] == [problem]
