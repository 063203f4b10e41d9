"""A run's spans, rebuilt from its history: the one source for export and `baton trace`.

Pure: history rows in (seq, at, type, key, data), span records out. The exporter
feeds it each commit's rows as they are written; `baton trace` feeds it a run's
whole history from the store. Both get the same spans with the same ids
(server/telemetry/ids.py), so a span exported days later, after a restart, lands
under the parent exported before it.

Which rows open and close which span:

    run.started, run.retry_requested   open   `run <workflow>` (one per run attempt)
    run.<terminal>                     close  it, and anything still open
    step.scheduled / compensation.scheduled
                                       open   `step <id>` / `compensate <id>` (one per attempt;
                                              PRODUCER when the step runs on a remote queue)
    task.succeeded / task.failed       close  the attempt (task id); a failure is an ERROR
    task.cancelled                     close  the attempt, cancelled
    timer.fired timeout:…/ctimeout:…   event  `timeout` on the attempt (its close follows)
    step.retrying                      event  `retry scheduled` (delay_s) on the failed attempt
    step.waiting {signal} / {until}    open   `signal <name>` / `sleep <id>`
    approval.requested                 open   `approval <id>`
    signal.received, approval.decided, timer.fired sleep:/signal:/approval:
                                       close  the wait, with an event saying what ended it

Steps inside a parallel or a map hang under a `step <container>` span that spans its
children; container spans and the run span are complete only when the run ends,
so they are exported then. Everything else is exported as it closes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.engine.graph import CompiledWorkflow
from server.telemetry.ids import run_span_id, run_trace_id, span_id, task_span_id, trigger_context, trigger_sampled

RUN_ENDS = {"run.succeeded", "run.failed", "run.compensated", "run.cancelled"}
# The row types `RunTrace` reads (the table above, and the events it adds): a caller may
# leave the data of any other row undecoded.
ROW_TYPES = frozenset(RUN_ENDS | {
    "run.started", "run.retry_requested", "run.compensating", "run.queued",
    "step.scheduled", "compensation.scheduled", "task.succeeded", "task.failed", "task.cancelled",
    "timer.fired", "step.retrying", "step.timed_out", "step.waiting", "approval.requested",
    "signal.received", "approval.decided", "step.failed", "step.cancelled", "step.skipped",
})
OK, ERROR, UNSET = "ok", "error", "unset"


@dataclass(slots=True)
class SpanRecord:
    span_id: str
    parent_id: str | None
    name: str
    start: float
    end: float | None = None  # None: still open (in progress)
    kind: str = "internal"  # internal | producer
    attributes: dict[str, Any] = field(default_factory=dict)
    # a list once an event is added: most spans have none, and an empty list per span would
    # be one more object for the garbage collector to track for the span's whole life
    events: list[tuple[str, float, dict[str, Any]]] | tuple[()] = ()
    status: str = UNSET
    message: str | None = None  # the error, for status ERROR
    key: str | None = None  # the step instance it belongs to (not exported)

    def event(self, name: str, at: float, attributes: dict[str, Any]) -> None:
        if isinstance(self.events, tuple):
            self.events = list(self.events)
        self.events.append((name, at, attributes))

    def close(self, at: float, status: str = UNSET, message: str | None = None, outcome: str | None = None) -> None:
        self.end = max(at, self.start)
        self.status, self.message = status, message
        if outcome is not None:
            self.attributes["baton.outcome"] = outcome


@dataclass(slots=True)
class _Wait:
    span: SpanRecord
    kind: str  # signal | sleep | approval
    key: str
    signal: str | None = None


class RunTrace:
    """The spans of one run, fed its history rows in order."""

    def __init__(self, run_id: str, graph: CompiledWorkflow | None, *, workflow: str, version: str,
                 workflow_id: str | None = None, event: Any = None, link_trigger: bool = False) -> None:
        self.run_id, self.graph = run_id, graph
        self.workflow, self.version, self.workflow_id = workflow, version, workflow_id
        trigger = trigger_context(event)
        self.trace_id = trigger[0] if trigger is not None and not link_trigger else run_trace_id(run_id)
        self.trigger_span = trigger[1] if trigger is not None else None
        self.trigger_sampled = trigger is not None and trigger_sampled(event)  # its traceparent's flags
        self.link_trigger = link_trigger  # the trigger's span as a link, not the parent
        self.attempt = 0
        self.run: SpanRecord | None = None
        self.attempts: dict[str, SpanRecord] = {}  # task id -> open attempt span
        self.last_closed: dict[str, SpanRecord] = {}  # step key -> its attempt closed most recently
        self.waits: dict[str, _Wait] = {}  # step key -> open wait
        self.containers: dict[str, SpanRecord] = {}  # container key -> its span (open until the run ends)
        self.seq = 0  # the last history row fed

    # ------------------------------------------------------------------ feed

    def feed(self, rows: list[tuple[int, float, str, str | None, Any]]) -> list[SpanRecord]:
        """Apply rows (seq, at, type, key, data) in order; the spans they closed. Rows at or
        below the last one fed are skipped, so a row replayed after a rebuild counts once."""
        closed: list[SpanRecord] = []
        for seq, at, type_, key, data in rows:
            if seq <= self.seq:
                continue
            self.seq = seq
            closed += self._apply(at, type_, key, data if isinstance(data, dict) else {})
        return closed

    def open_spans(self) -> list[SpanRecord]:
        spans = [] if self.run is None else [self.run]
        return spans + list(self.containers.values()) + list(self.attempts.values()) + [w.span for w in self.waits.values()]

    def _apply(self, at: float, type_: str, key: str | None, data: dict[str, Any]) -> list[SpanRecord]:
        if type_ in ("run.started", "run.retry_requested"):
            return self._open_run(at, data)
        if type_ in RUN_ENDS:
            return self._end_run(at, type_.partition(".")[2], data)
        if self.run is None:
            return []  # rows before a run span exists (none in practice): nothing to hang them on
        if type_ in ("step.scheduled", "compensation.scheduled") and key is not None:
            self._open_attempt(at, key, data, compensation=type_ == "compensation.scheduled")
        elif type_ in ("task.succeeded", "task.failed", "task.cancelled"):
            return self._close_attempt(at, type_, data)
        elif type_ == "timer.fired":
            return self._timer(at, str(data.get("timer_id", "")))
        elif type_ == "step.retrying" and key is not None:
            target = self.last_closed.get(key)
            if target is not None:
                target.event("retry scheduled", at, {"baton.retry.delay_s": data.get("delay_s")})
        elif type_ == "step.timed_out" and key is not None:
            return self._close_wait(key, at, "timeout", {}, UNSET, "timed_out")
        elif type_ == "step.waiting" and key is not None:
            self._open_wait(at, key, "signal" if "signal" in data else "sleep", data.get("signal"))
        elif type_ == "approval.requested" and key is not None:
            self._open_wait(at, key, "approval", None)
        elif type_ == "signal.received":
            return self._signal(at, data)
        elif type_ == "approval.decided" and key is not None:
            decision = data.get("decision")
            by = data.get("by")  # {"name", "via"} from a person; "timeout" when the timeout decided
            attrs = {"baton.approval.decision": decision,
                     "baton.approval.by": str((by.get("name") if isinstance(by, dict) else by) or "")}
            if isinstance(by, dict) and by.get("via"):
                attrs["baton.approval.via"] = str(by["via"])
            return self._close_wait(key, at, "approval decided", attrs, OK if decision == "approve" else UNSET,
                                    str(decision))
        elif type_ in ("step.failed", "step.cancelled") and key is not None:
            return self._close_wait(key, at, type_, {}, ERROR if type_ == "step.failed" else UNSET,
                                    type_.partition(".")[2], message=data.get("message"))
        elif type_ == "run.compensating":
            self.run.event("compensating", at, {"baton.steps": ", ".join(data.get("steps") or [])})
        elif type_ == "run.queued":
            self.run.event("queued", at, {})
        elif type_ == "step.skipped" and key is not None:
            self.run.event("step skipped", at, {"baton.step.id": key})
        return []

    # ------------------------------------------------------------------- run

    def _open_run(self, at: float, data: dict[str, Any]) -> list[SpanRecord]:
        closed = self._close_all(at) if self.run is not None else []
        self.attempt += 1
        attrs = {
            "baton.workflow.name": self.workflow, "baton.workflow.version": self.version,
            "baton.run.id": self.run_id, "baton.run.attempt": self.attempt,
        }
        if self.workflow_id:
            attrs["baton.workflow_id"] = self.workflow_id
        if data.get("by"):
            attrs["baton.run.started_by"] = data["by"]
        parent = None if self.link_trigger else self.trigger_span
        self.run = SpanRecord(run_span_id(self.run_id, self.attempt), parent, f"run {self.workflow}", at,
                              attributes=attrs)
        if self.link_trigger and self.trigger_span is not None:
            self.run.attributes["baton.trigger.span_id"] = self.trigger_span
        return closed

    def _end_run(self, at: float, status: str, data: dict[str, Any]) -> list[SpanRecord]:
        if self.run is None:
            return []
        if status == "succeeded":  # history has no end of a parallel or map step: the run's success is theirs
            for span in self.containers.values():
                span.status = OK if span.status == UNSET else span.status
        closed = self._close_all(at)
        error = data.get("error") if isinstance(data.get("error"), dict) else None
        if status == "succeeded":
            self.run.close(at, OK, outcome=status)
        elif status == "cancelled":
            self.run.close(at, UNSET, outcome=status)
        else:
            self.run.close(at, ERROR, _message(error) or status, outcome=status)
        run, self.run = self.run, None
        return closed + [run]

    def _close_all(self, at: float) -> list[SpanRecord]:
        """The run attempt ended: whatever is still open ends with it."""
        closed: list[SpanRecord] = []
        for span in self.attempts.values():
            span.close(at, UNSET, outcome="cancelled")
            closed.append(span)
        for wait in self.waits.values():
            wait.span.close(at, UNSET, outcome="cancelled")
            closed.append(wait.span)
        for span in self.containers.values():
            span.end = span.end if span.end is not None else at
            closed.append(span)
        self.attempts.clear()
        self.waits.clear()
        self.containers.clear()
        return closed

    # -------------------------------------------------------------- attempts

    def _open_attempt(self, at: float, key: str, data: dict[str, Any], *, compensation: bool) -> None:
        task_id = str(data.get("task_id", ""))
        step_id = key.rpartition("/")[2]
        # the run span carries the workflow's version and workflow_id; a step span what finds
        # and tells it apart (every attribute costs encoding time on every span)
        attrs = {
            "baton.workflow.name": self.workflow, "baton.run.id": self.run_id, "baton.step.id": step_id,
            "baton.step.kind": "compensation" if compensation else "task", "baton.task.id": task_id,
            "baton.step.attempt": data.get("attempt"), "baton.handler": data.get("handler"),
        }
        if key != step_id:  # inside a map: which item
            attrs["baton.step.key"] = key
        if data.get("queue"):
            attrs["baton.queue"] = data["queue"]
        name = f"{'compensate' if compensation else 'step'} {step_id}"
        parent = self.run.span_id if compensation else self._parent_of(key, at)
        span = SpanRecord(task_span_id(task_id), parent, name, at, kind="producer" if data.get("queue") else "internal",
                          attributes=attrs, key=key)
        self.attempts[task_id] = span

    def _close_attempt(self, at: float, type_: str, data: dict[str, Any]) -> list[SpanRecord]:
        span = self.attempts.pop(str(data.get("task_id", "")), None)
        if span is None:
            return []  # a late or duplicate result: the attempt was closed already
        if type_ == "task.succeeded":
            span.close(at, OK, outcome="succeeded")
        elif type_ == "task.failed":
            error = data.get("error") if isinstance(data.get("error"), dict) else {}
            span.event("exception", at, {"exception.type": str(error.get("type", "Error")),
                                         "exception.message": str(error.get("message", ""))})
            span.close(at, ERROR, _message(error), outcome="failed")
        else:
            span.close(at, UNSET, outcome="cancelled")
        self.last_closed[span.key] = span
        self._extend_containers(span)
        return [span]

    def _timer(self, at: float, timer_id: str) -> list[SpanRecord]:
        kind, _, rest = timer_id.partition(":")
        if kind in ("timeout", "ctimeout"):
            key, _, attempt = rest.rpartition(":")
            task_id = f"{self.run_id}:{key}:{attempt}" if kind == "timeout" else f"{self.run_id}:{key}:compensate:{attempt}"
            span = self.attempts.get(task_id)
            if span is not None:
                span.event("timeout", at, {})
                self.attempts.pop(task_id)
                span.close(at, ERROR, "timed out", outcome="timed_out")
                self.last_closed[span.key] = span
                self._extend_containers(span)
                return [span]
            return []
        if kind in ("sleep", "signal", "approval"):
            what = {"sleep": ("woke", OK, "succeeded"), "signal": ("timeout", UNSET, "timed_out"),
                    "approval": ("timeout", UNSET, "timed_out")}[kind]
            return self._close_wait(rest, at, what[0], {}, what[1], what[2])
        return []

    # ----------------------------------------------------------------- waits

    def _open_wait(self, at: float, key: str, kind: str, signal: str | None) -> None:
        step_id = key.rpartition("/")[2]
        name = f"signal {signal}" if kind == "signal" else f"{kind} {step_id}"
        attrs = {"baton.workflow.name": self.workflow, "baton.run.id": self.run_id, "baton.step.id": step_id,
                 "baton.step.kind": kind}
        if key != step_id:
            attrs["baton.step.key"] = key
        if signal is not None:
            attrs["baton.signal"] = signal
        span = SpanRecord(span_id(self.run_id, "wait", key, self.attempt, at), self._parent_of(key, at), name, at,
                          attributes=attrs, key=key)
        self.waits[key] = _Wait(span, kind, key, signal)

    def _signal(self, at: float, data: dict[str, Any]) -> list[SpanRecord]:
        name = data.get("name")
        keys = [k for k, w in self.waits.items() if w.kind == "signal" and w.signal == name]
        closed: list[SpanRecord] = []
        for key in keys:
            closed += self._close_wait(key, at, "signal received", {"baton.signal.by": data.get("by") or ""}, OK, "succeeded")
        return closed

    def _close_wait(self, key: str, at: float, event: str, attrs: dict[str, Any], status: str, outcome: str,
                    message: str | None = None) -> list[SpanRecord]:
        wait = self.waits.pop(key, None)
        if wait is None:
            return []
        wait.span.event(event, at, attrs)
        wait.span.close(at, status, message if status == ERROR else None, outcome=outcome)
        self._extend_containers(wait.span)
        return [wait.span]

    # ------------------------------------------------------------ containers

    def _container_key(self, key: str) -> str | None:
        """The key of the parallel or map instance a step key runs in, or None at top level."""
        if self.graph is None:
            return None
        node = self.graph.nodes.get(key.rpartition("/")[2])
        if node is None or node.container is None:
            return None
        prefix, slash, _ = key.rpartition("/")
        container = self.graph.nodes.get(node.container)
        if container is not None and container.kind == "map" and slash:
            return prefix.rpartition("[")[0]  # `<map key>[<i>]/<id>` runs in the map `<map key>`
        return f"{prefix}/{node.container}" if slash else node.container

    def _parent_of(self, key: str, at: float) -> str:
        ckey = self._container_key(key)
        if ckey is None:
            return self.run.span_id
        span = self.containers.get(ckey)
        if span is None:
            step_id = ckey.rpartition("/")[2]
            kind = self.graph.nodes[step_id].kind if step_id in self.graph.nodes else "container"
            span = SpanRecord(span_id(self.run_id, "container", ckey, self.attempt), self._parent_of(ckey, at),
                              f"step {step_id}", at, key=ckey, attributes={
                                  "baton.workflow.name": self.workflow, "baton.run.id": self.run_id,
                                  "baton.step.id": step_id, "baton.step.key": ckey, "baton.step.kind": kind})
            self.containers[ckey] = span
        return span.span_id

    def _extend_containers(self, child: SpanRecord) -> None:
        """A container lasts until its last child ends."""
        key = child.key
        while key is not None:
            ckey = self._container_key(key)
            span = self.containers.get(ckey) if ckey is not None else None
            if span is None:
                return
            span.end = max(span.end or child.end, child.end)
            if child.status == ERROR:
                span.status, span.message = ERROR, child.message
            key = ckey


def _message(error: dict[str, Any] | None) -> str | None:
    if not error:
        return None
    return f"{error.get('type', 'Error')}: {error.get('message', '')}"
