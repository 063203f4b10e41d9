"""Compile a Workflow model into the flat graph the engine walks.

Rules:
* Step ids are unique across the whole workflow, nested steps included, so
  `steps.<id>.output` is never ambiguous.
* `needs` names steps of the same list (siblings: the workflow's top-level list,
  one parallel branch, or a map's per-item steps). Absent `needs` means the
  previous sibling; `[]` means none. Cycles are errors.
* Every template and expression is compiled here, so a bad one is a load-time
  error, not a run-time surprise.

Compile errors are collected, not raised one by one: `GraphError.problems` is a
list of `(loc, message)` where `loc` is a pydantic-style path into the YAML
document, e.g. `("steps", 2, "needs", 0)`; the loader turns it into file:line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from server.definitions.expressions import Expression, Template
from server.definitions.models import DEFAULT_HEARTBEAT_S, NO_RETRY, RetryPolicy, Step, Workflow
from server.errors import ExpressionError

Loc = tuple[Any, ...]


class GraphError(Exception):
    def __init__(self, problems: list[tuple[Loc, str]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Node:
    id: str
    kind: str
    step: Step
    loc: Loc
    container: str | None  # enclosing parallel or map step id; None at top level
    needs: tuple[str, ...]
    dependents: tuple[str, ...]
    children: tuple[str, ...]  # parallel: every direct child; map: the per-item steps
    last_children: dict[str, str]  # parallel: branch -> last step id; map: {"": last step id}
    retry: RetryPolicy
    timeout_s: float | None
    when: Expression | None = None
    input: Template | None = None
    items: Expression | None = None
    wait_until: Template | None = None
    child_input: Template | None = None
    child_workflow_id: Template | None = None
    compensate_input: Template | None = None
    compensate_retry: RetryPolicy = NO_RETRY
    heartbeat_s: float | None = None  # queue steps: a worker silent this long is taken for dead
    approval_message: Template | None = None
    queue: str | None = None  # the remote queue its task (and compensation) is sent to; None: run in process
    # an in-process step sent to the replicas' shared queue (on_queue): an attempt whose
    # worker went silent died with its replica, like an attempt cut short by a crash of a
    # single server, so it is made again at once, whatever the retry policy, up to
    # LOST_ATTEMPTS times more than the policy allows (a handler that kills its process every
    # time must not go round the cluster for ever)
    replace_lost: bool = False


@dataclass(frozen=True, slots=True)
class CompiledWorkflow:
    definition: Workflow
    nodes: dict[str, Node]
    roots: tuple[str, ...]  # top-level step ids in list order
    def_hash: str = ""
    # every handler this process must have: queue steps' handlers live in remote workers
    handlers: frozenset[str] = field(default_factory=frozenset)
    output: Template | None = None

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def version(self) -> str:
        return self.definition.version


class _Compiler:
    def __init__(self, wf: Workflow) -> None:
        self.wf = wf
        self.problems: list[tuple[Loc, str]] = []
        self.nodes: dict[str, Node] = {}
        self.seen: dict[str, Loc] = {}
        self.handlers: set[str] = set()

    def compile(self) -> CompiledWorkflow:
        self._collect_ids(self.wf.steps, ("steps",))
        roots = self._compile_list(self.wf.steps, ("steps",), None)
        if self.wf.concurrency is not None and self.wf.concurrency.key is not None:
            self._template(self.wf.concurrency.key, ("concurrency", "key"))
        output = self._template(self.wf.output, ("output",)) if self.wf.output is not None else None
        if self.problems:
            raise GraphError(self.problems)
        return CompiledWorkflow(self.wf, self.nodes, roots, handlers=frozenset(self.handlers), output=output)

    def _collect_ids(self, steps: list[Step], loc: Loc) -> None:
        for i, step in enumerate(steps):
            here = (*loc, i)
            if step.id in self.seen:
                first = ".".join(map(str, self.seen[step.id]))
                self.problems.append(((*here, "id"), f"duplicate step id {step.id!r} (first used at {first})"))
            else:
                self.seen[step.id] = here
            if step.parallel is not None:
                for branch, inner in step.parallel.items():
                    self._collect_ids(inner, (*here, "parallel", branch))
            if step.map is not None:
                self._collect_ids(step.map.steps, (*here, "map", "steps"))

    def _compile_list(self, steps: list[Step], loc: Loc, container: str | None) -> tuple[str, ...]:
        ids = [s.id for s in steps]
        needs: dict[str, tuple[str, ...]] = {}
        for i, step in enumerate(steps):
            if step.needs is None:
                needs[step.id] = (ids[i - 1],) if i > 0 else ()
                continue
            resolved = []
            for j, need in enumerate(step.needs):
                if need not in ids:
                    where = "workflow" if container is None else f"step {container!r}"
                    self.problems.append(
                        ((*loc, i, "needs", j), f"unknown step {need!r}: needs must name a step of the same list in this {where}")
                    )
                elif need == step.id:
                    self.problems.append(((*loc, i, "needs", j), f"step {step.id!r} cannot need itself"))
                else:
                    resolved.append(need)
            needs[step.id] = tuple(dict.fromkeys(resolved))
        self._check_cycles(ids, needs, loc)
        dependents: dict[str, list[str]] = {sid: [] for sid in ids}
        for sid in ids:
            for need in needs[sid]:
                if need in dependents:
                    dependents[need].append(sid)
        for i, step in enumerate(steps):
            self._compile_step(step, (*loc, i), container, needs[step.id], tuple(dependents[step.id]))
        return tuple(ids)

    def _check_cycles(self, ids: list[str], needs: dict[str, tuple[str, ...]], loc: Loc) -> None:
        state: dict[str, int] = {}  # 1 = on the stack, 2 = done

        def visit(sid: str, path: list[str]) -> None:
            state[sid] = 1
            for need in needs.get(sid, ()):
                if state.get(need) == 1:
                    cycle = path[path.index(need):] + [need] if need in path else [sid, need]
                    i = ids.index(sid)
                    self.problems.append(((*loc, i, "needs"), f"cycle in needs: {' -> '.join(cycle)}"))
                elif need not in state:
                    visit(need, [*path, need])
            state[sid] = 2

        for sid in ids:
            if sid not in state:
                visit(sid, [sid])

    def _compile_step(self, step: Step, loc: Loc, container: str | None, needs: tuple[str, ...], dependents: tuple[str, ...]) -> None:
        defaults = self.wf.defaults
        retry = step.retry or defaults.retry or NO_RETRY
        # defaults.timeout bounds handler attempts; it must not cut a sleep or an approval short.
        timeout_s = step.timeout
        if timeout_s is None and step.task is not None:
            timeout_s = defaults.timeout
        kw: dict[str, Any] = {}
        children: tuple[str, ...] = ()
        last: dict[str, str] = {}
        if step.when is not None:
            kw["when"] = self._expression(step.when, (*loc, "when"))
        if step.queue is not None:
            kw["queue"] = step.queue
            kw["heartbeat_s"] = step.heartbeat or DEFAULT_HEARTBEAT_S
        if step.task is not None:
            if step.queue is None:
                self.handlers.add(step.task)
            kw["input"] = self._template(step.input, (*loc, "input"))
        elif step.wait_for_signal is not None and step.wait_for_signal.approval is not None:
            message = step.wait_for_signal.approval.message
            if message is not None:
                kw["approval_message"] = self._template(message, (*loc, "wait_for_signal", "approval", "message"))
        elif step.wait_until is not None:
            kw["wait_until"] = self._template(step.wait_until, (*loc, "wait_until"))
        elif step.workflow is not None:
            kw["child_input"] = self._template(step.workflow.input, (*loc, "workflow", "input"))
            kw["child_workflow_id"] = self._template(step.workflow.workflow_id, (*loc, "workflow", "workflow_id"))
        elif step.parallel is not None:
            all_children: list[str] = []
            for branch, inner in step.parallel.items():
                all_children += self._compile_list(inner, (*loc, "parallel", branch), step.id)
                last[branch] = inner[-1].id
            children = tuple(all_children)
        elif step.map is not None:
            kw["items"] = self._expression(step.map.items, (*loc, "map", "items"))
            children = self._compile_list(step.map.steps, (*loc, "map", "steps"), step.id)
            last[""] = step.map.steps[-1].id
        if step.compensate is not None:
            if step.queue is None:  # a compensation runs where its step ran
                self.handlers.add(step.compensate.task)
            kw["compensate_input"] = self._template(step.compensate.input, (*loc, "compensate", "input"))
            kw["compensate_retry"] = step.compensate.retry or NO_RETRY
        self.nodes[step.id] = Node(
            id=step.id, kind=step.kind, step=step, loc=loc, container=container, needs=needs,
            dependents=dependents, children=children, last_children=last, retry=retry,
            timeout_s=timeout_s, **kw,
        )

    def _expression(self, source: str, loc: Loc) -> Expression | None:
        try:
            return Expression(source)
        except ExpressionError as exc:
            self.problems.append((loc, exc.message))
            return None

    def _template(self, source: Any, loc: Loc) -> Template | None:
        try:
            return Template(source)
        except ExpressionError as exc:
            self.problems.append((loc, exc.message))
            return None


def on_queue(graph: CompiledWorkflow, queue: str, heartbeat_s: float) -> CompiledWorkflow:
    """The same workflow with every in-process task step (and its compensation) sent to
    `queue` instead, with a heartbeat deadline: how replicas sharing one database run
    steps, so that any of them may run any attempt and a dead one's are retried."""
    nodes = {
        sid: dataclasses.replace(node, queue=queue, heartbeat_s=heartbeat_s, replace_lost=True)
        if node.queue is None and (node.step.task is not None or node.step.compensate is not None) else node
        for sid, node in graph.nodes.items()
    }
    return dataclasses.replace(graph, nodes=nodes)


def compile_workflow(wf: Workflow, def_hash: str = "") -> CompiledWorkflow:
    """The engine's view of a workflow; raises GraphError listing every problem found."""
    compiled = _Compiler(wf).compile()
    if def_hash:
        return dataclasses.replace(compiled, def_hash=def_hash)
    return compiled
