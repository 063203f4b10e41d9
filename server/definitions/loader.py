"""Load workflow files: YAML text -> validated model -> compiled graph, or file:line errors.

Every problem is one line, `{file}:{line}: {field}: {message}`, e.g.
`orders.yaml:12: steps[2].needs[0]: unknown step 'pay'`, so editors and CI can jump
to it. `field` is `<root>` when no field applies (a YAML syntax error). Problems are
collected, not raised one by one: the author fixes a file in one pass.

Lines come from ruamel.yaml's round-trip tree, which remembers where each key and
item was; pydantic and the graph compiler report pydantic-style locs
(`("steps", 2, "needs", 0)`) that we walk down that tree.

A workflow's identity is `def_hash`: sha256 of its canonical JSON (sorted keys,
defaults filled in), so reformatting a file keeps the hash and any real change moves it.
"""

from __future__ import annotations

import difflib
import hashlib
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from jsonschema import Draft202012Validator
from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.constructor import RoundTripConstructor
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.reader import ReaderError
from ruamel.yaml.scalarbool import ScalarBoolean

from server.definitions.models import Step, Workflow
from server.definitions.triggers import TriggerError, compile_event_trigger, compile_webhook_trigger
from server.engine.graph import CompiledWorkflow, GraphError, Loc, compile_workflow
from server.errors import DefinitionError

ROOT = "<root>"
Report = Callable[[Loc, str], None]  # records one problem at a loc
MAX_HANDLERS_LISTED = 5  # enough to spot a typo without flooding the terminal
# pydantic prefixes its messages with the kind of error; the field path already says enough.
_NOISY_PREFIXES = ("Value error, ", "Assertion failed, ")
# JSON numbers as SQLite and orjson store them: signed 64-bit
MIN_INT, MAX_INT = -(2**63), 2**63 - 1
# Far deeper than any workflow needs, and well inside what the definition's hash (orjson,
# 254 levels) and pydantic can walk.
MAX_DEPTH = 64
_KIND_NAMES = {CommentedSeq: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}


@dataclass(frozen=True)
class LoadedWorkflow:
    model: Workflow
    compiled: CompiledWorkflow
    def_hash: str
    path: str
    source: str


# --- public API ------------------------------------------------------------------


def load_workflow_text(
    text: str, filename: str = "<string>", known_handlers: Collection[str] | None = None
) -> LoadedWorkflow:
    """Parse, validate and compile one workflow; raises DefinitionError listing every problem."""
    return _load(text, filename, known_handlers)[0]


def load_paths(
    paths: Sequence[str | Path], known_handlers: Collection[str] | None = None
) -> tuple[list[LoadedWorkflow], list[str]]:
    """Load files and directories (their *.yaml / *.yml, sorted, not recursive).

    Returns what loaded and every problem. A path that cannot be read has no line,
    so its problem is `{path}: {message}`. The same name+version with different
    content in two files is a problem; the first file wins.
    """
    loaded: list[LoadedWorkflow] = []
    problems: list[str] = []
    first_seen: dict[tuple[str, str], LoadedWorkflow] = {}
    docs: dict[int, CommentedMap] = {}  # id(loaded workflow) -> its YAML tree, for lines
    for file in _expand(paths, problems):
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{file}: cannot read: {exc}")
            continue
        try:
            wf, doc = _load(text, str(file), known_handlers)
        except DefinitionError as exc:
            problems += exc.problems
            continue
        key = (wf.model.name, wf.model.version)
        other = first_seen.setdefault(key, wf)
        if other is wf:
            loaded.append(wf)
            docs[id(wf)] = doc
        elif other.def_hash != wf.def_hash:
            problems.append(_problem(
                wf.path, _line_of(doc, ("name",)), ("name",),
                f"workflow {key[0]!r} version {key[1]!r} is also defined, differently, in {other.path}",
            ))
    problems += _check_webhook_paths(loaded, docs)
    return loaded, problems


def workflow_json_schema() -> dict[str, Any]:
    """JSON Schema of the workflow language, for editors (YAML language servers)."""
    schema = Workflow.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Baton workflow",
        "description": "A Baton workflow definition. Cross-step rules (unique ids, known needs, "
        "no cycles, known handlers, templates that compile) are checked by `baton` itself.",
        **{k: v for k, v in schema.items() if k not in ("title", "description")},
    }


# --- the pipeline ----------------------------------------------------------------


def _load(
    text: str, filename: str, known_handlers: Collection[str] | None
) -> tuple[LoadedWorkflow, CommentedMap]:
    doc = _parse_yaml(text, filename)
    problems: list[tuple[int, str]] = []  # (line, problem) so we can report in file order

    def add(loc: Loc, message: str) -> None:
        line = _line_of(doc, loc)
        problems.append((line, _problem(filename, line, loc, message)))

    data = _plain(doc, (), add)
    model = _validate(data, add)
    _check_input_schema(data.get("input_schema"), add)
    compiled = def_hash = None
    if model is not None:
        def_hash = hashlib.sha256(
            orjson.dumps(model.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
        ).hexdigest()
        try:
            compiled = compile_workflow(model, def_hash)
        except GraphError as exc:
            for loc, message in exc.problems:
                add(loc, message)
        _check_triggers(model, add)
        if known_handlers is not None:
            _check_handlers(model.steps, ("steps",), known_handlers, add)
    if problems:
        raise DefinitionError([p for _, p in sorted(problems, key=lambda lp: lp[0])])
    assert model is not None and compiled is not None and def_hash is not None
    return LoadedWorkflow(model, compiled, def_hash, filename, text), doc


def _parse_yaml(text: str, filename: str) -> CommentedMap:
    yaml = YAML(typ="rt")
    yaml.Constructor = _Constructor
    try:
        doc = yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        detail = ", ".join(part for part in (exc.context, exc.problem) if part)
        raise DefinitionError([_problem(filename, line, (), f"invalid YAML: {detail}")]) from None
    except ReaderError as exc:  # a control character: it carries a position, not a line
        line = text.count("\n", 0, exc.position) + 1
        raise DefinitionError([_problem(filename, line, (), f"invalid YAML: {exc.reason}")]) from None
    except YAMLError as exc:
        raise DefinitionError([_problem(filename, 1, (), f"invalid YAML: {exc}")]) from None
    except RecursionError:  # ruamel composes nested nodes recursively: a few hundred levels exhaust the stack
        raise DefinitionError([_problem(filename, 1, (), f"invalid YAML: nested too deeply (a workflow may nest "
                                                         f"{MAX_DEPTH} levels)")]) from None
    if not isinstance(doc, CommentedMap):
        found = "an empty document" if doc is None else _KIND_NAMES.get(type(doc), type(doc).__name__)
        line = doc.lc.line + 1 if isinstance(doc, CommentedSeq) else 1
        raise DefinitionError([_problem(filename, line, (), f"a workflow must be a mapping, found {found}")])
    return doc


class _Constructor(RoundTripConstructor):
    """Keep timestamps as the text written: workflows are JSON-like, and a template
    like `wait_until: 2024-05-01T10:00:00Z` means that string, not a datetime."""


_Constructor.add_constructor("tag:yaml.org,2002:timestamp", RoundTripConstructor.construct_yaml_str)


def _plain(node: Any, loc: Loc, add: Report) -> Any:
    """ruamel's round-trip types -> plain JSON-like dicts, lists and scalars."""
    if len(loc) > MAX_DEPTH and isinstance(node, (dict, list)):
        add(loc, f"nested more than {MAX_DEPTH} levels deep")
        return None
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if not isinstance(key, str):  # JSON has string keys only; don't guess a spelling
                add((*loc, key), f"mapping keys must be strings, found {type(key).__name__} {key!r}")
                continue
            out[str(key)] = _plain(value, (*loc, key), add)
        return out
    if isinstance(node, list):
        return [_plain(v, (*loc, i), add) for i, v in enumerate(node)]
    if isinstance(node, ScalarBoolean):  # an anchored boolean; it subclasses int
        return bool(node)
    if isinstance(node, int) and not isinstance(node, bool) and not MIN_INT <= node <= MAX_INT:
        add(loc, f"integer {node} is out of range: numbers in a workflow must fit in 64 bits")
        return None
    for plain_type in (bool, str, int, float):
        if isinstance(node, plain_type):
            return plain_type(node)
    if node is None:
        return None
    add(loc, f"unsupported YAML value of type {type(node).__name__}")
    return None


def _validate(data: dict[str, Any], add: Report) -> Workflow | None:
    try:
        return Workflow.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc, message = err["loc"], err["msg"]
            if loc and loc[-1] == "[key]":  # pydantic's marker for a bad dict key
                loc, message = loc[:-1], f"invalid key: {message}"
            if err["type"] == "extra_forbidden":
                message = "unknown field"
            for prefix in _NOISY_PREFIXES:
                message = message.removeprefix(prefix)
            add(loc, message)
        return None


def _check_input_schema(schema: Any, add: Report) -> None:
    if not isinstance(schema, dict):
        return  # absent, or already reported by pydantic as the wrong type
    # What Draft202012Validator.check_schema does, but reporting every error, not the first.
    meta = Draft202012Validator(
        Draft202012Validator.META_SCHEMA, format_checker=Draft202012Validator.FORMAT_CHECKER
    )
    for err in meta.iter_errors(schema):
        add(("input_schema", *err.absolute_path), f"not a valid JSON Schema: {err.message}")


def _check_triggers(model: Workflow, add: Report) -> None:
    """Trigger templates and filters must compile (they are rendered outside the engine);
    one workflow may not serve a webhook path twice."""
    paths: dict[str, int] = {}
    for i, trigger in enumerate(model.triggers):
        try:
            if trigger.event is not None:
                loc: Loc = ("triggers", i, "event")
                compile_event_trigger(trigger.event)
            elif trigger.webhook is not None:
                loc = ("triggers", i, "webhook")
                first = paths.setdefault(trigger.webhook.path, i)
                if first != i:
                    add((*loc, "path"), f"webhook path {trigger.webhook.path!r} is already served by triggers[{first}]")
                compile_webhook_trigger(trigger.webhook)
        except TriggerError as exc:
            add((*loc, exc.part), exc.message)


def _check_webhook_paths(loaded: list[LoadedWorkflow], docs: dict[int, CommentedMap]) -> list[str]:
    """Two workflows may not serve one webhook path: each path has one secret and one
    workflow to start. Only latest versions serve hooks, so older ones may keep theirs."""
    from server.definitions.catalog import compare_versions  # the catalog imports this module

    latest: dict[str, LoadedWorkflow] = {}
    for wf in loaded:  # one per name and version: load_paths kept the first file of each
        have = latest.get(wf.model.name)
        if have is None or compare_versions(wf.model.version, have.model.version) >= 0:
            latest[wf.model.name] = wf
    owner: dict[str, tuple[LoadedWorkflow, int]] = {}
    problems = []
    for wf in latest.values():
        for i, trigger in enumerate(wf.model.triggers):
            if trigger.webhook is None:
                continue
            loc = ("triggers", i, "webhook", "path")
            first = owner.setdefault(trigger.webhook.path, (wf, i))
            if first[0] is not wf:
                other, j = first
                where = f"{other.path}:{_line_of(docs[id(other)], ('triggers', j, 'webhook', 'path'))}"
                problems.append(_problem(
                    wf.path, _line_of(docs[id(wf)], loc), loc,
                    f"webhook path {trigger.webhook.path!r} is already served by workflow {other.model.name!r} "
                    f"({where}); each path starts one workflow",
                ))
    return problems


def _check_handlers(steps: list[Step], loc: Loc, known: Collection[str], add: Report) -> None:
    for i, step in enumerate(steps):
        here = (*loc, i)
        if step.queue is not None:
            continue  # its handlers (and its compensation's) live in the queue's workers
        if step.task is not None and step.task not in known:
            add((*here, "task"), _unknown_handler(step.task, known))
        if step.compensate is not None and step.compensate.task not in known:
            add((*here, "compensate", "task"), _unknown_handler(step.compensate.task, known))
        for branch, inner in (step.parallel or {}).items():
            _check_handlers(inner, (*here, "parallel", branch), known, add)
        if step.map is not None:
            _check_handlers(step.map.steps, (*here, "map", "steps"), known, add)


def _unknown_handler(name: str, known: Collection[str]) -> str:
    if not known:
        return f"unknown handler {name!r} (no handlers are registered)"
    # Close matches first, so a typo shows its fix; then the rest, alphabetically.
    close = difflib.get_close_matches(name, known, n=MAX_HANDLERS_LISTED, cutoff=0.6)
    listed = list(dict.fromkeys([*close, *sorted(known)]))[:MAX_HANDLERS_LISTED]
    more = ", ..." if len(known) > len(listed) else ""
    return f"unknown handler {name!r} (known: {', '.join(listed)}{more})"


# --- locations -------------------------------------------------------------------


def problem_at(loaded: LoadedWorkflow, loc: Loc, message: str) -> str:
    """A problem found after loading (a schedule's calendar, say) in the loader's own
    `file:line: field: message` form."""
    return _problem(loaded.path, _line_of(_parse_yaml(loaded.source, loaded.path), loc), loc, message)


def _problem(filename: str, line: int, loc: Loc, message: str) -> str:
    return f"{filename}:{line}: {_field_path(loc)}: {message}"


def _field_path(loc: Loc) -> str:
    """("steps", 2, "needs", 0) -> "steps[2].needs[0]"."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return path or ROOT


def _line_of(doc: CommentedMap, loc: Loc) -> int:
    """1-based line of the deepest part of `loc` present in the YAML tree.

    A key's line for a mapping, an item's line for a sequence. When `loc` names
    something absent (a missing required field), the enclosing mapping's line.
    """
    node: Any = doc
    line = doc.lc.line
    for part in loc:
        position = _position(node, part)
        if position is None:
            return (node.lc.line if isinstance(node, (CommentedMap, CommentedSeq)) else line) + 1
        line, node = position[0], node[part]
    return line + 1


def _position(node: Any, part: Any) -> tuple[int, int] | None:
    try:
        if isinstance(node, CommentedMap) and part in node:
            return node.lc.key(part)
        if isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
            return node.lc.item(part)
    except (KeyError, TypeError):  # a key merged in with `<<:` has no position of its own
        return None
    return None


def _expand(paths: Sequence[str | Path], problems: list[str]) -> Iterator[Path]:
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            yield from sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
        elif path.is_file():
            yield path
        else:
            problems.append(f"{path}: no such file or directory")
