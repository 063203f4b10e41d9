"""decide(state, event) -> (state, commands): the whole of a run's logic, with no I/O.

Rules:
1. A step instance starts when its scope is open and every step it `needs` is done
   (succeeded or skipped). A skipped step satisfies its dependents: a `when` that is
   false removes one step, not the branch below it. Dependents that should not run
   say so with their own `when` (e.g. `steps.x.status == 'succeeded'`).
2. A scope is the top level, a running parallel step, or one iteration of a map. It
   closes when all its steps are done; closing the top level succeeds the run (its
   output is the workflow's `output` template, or else the output of the last
   top-level step that was not skipped), closing a parallel step succeeds it
   (output: branch -> the branch's last step output), closing an iteration frees a
   map slot (output: the list of each iteration's last step output, in item order).
3. A task attempt that fails is retried per its policy after a delay (a durable
   timer; jitter arrives with the event). A step that fails for good fails the run.
4. A failing or cancelled run halts: in-flight tasks are cancelled (their late
   results are ignored), timers and waits dropped. Then the compensators of the
   succeeded steps run one at a time, in reverse order of completion, each with its
   own retry policy. The run ends `compensated` (or `cancelled`), or `failed` if any
   compensation failed; nothing to compensate ends it `failed`/`cancelled` directly.
5. Retry of a finished, unsuccessful run starts a new run attempt that keeps every
   succeeded step whose compensation never started (its output is reused, it never
   runs again) and runs the rest afresh, with attempt numbers that keep counting up
   (so idempotency keys never repeat). A step whose compensation ran, even if the
   compensation failed, is treated as undone and runs again.
6. Late or duplicate results (a task id no longer in flight, a timer no longer
   armed, a signal nobody waits for) change nothing; they are recorded.
7. A task on a remote queue waits in its queue for a worker (bounded only by the
   step's `timeout`). When a worker starts it (TaskStarted) its heartbeat deadline
   is armed; each heartbeat moves it; if it passes, the attempt fails with a
   retryable HeartbeatTimeout (the worker is taken for dead) and the retry policy
   applies. Heartbeats are not history: they only move a deadline.
8. An approval is a signal wait that only a decision (ApprovalDecided) ends, never a
   plain signal: it is not in `signals`. Each time the step is entered is a new
   request (the step's attempt counts them, id `<run_id>:<key>:<attempt>`), noted
   `approval.requested` with the rendered message; the runtime turns that note into
   a stored request and a signed link. A decision for another attempt, or for a step
   no longer waiting, is ignored (rule 6), so an old link never decides a new
   request. Approve: the step succeeds with {"decision", "by", "via", "comment",
   "at"}. Reject: the step fails, not retried (ApprovalRejected; the run fails and
   compensates), or with `on_reject: continue` succeeds with decision "reject". The
   timer `approval:<key>` decides per `on_timeout` as "timeout" would, or fails the
   step (ApprovalTimeout). A run that halts drops the request (`approval.cancelled`).

The state is mutated in place and returned; callers that need the old value copy it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from typing import Any

from server.engine.commands import (
    CancelChild, CancelTask, CancelTimer, Command, ExecuteTask, Record, RunFinished, StartChild, StartTimer,
)
from server.engine.events import (
    ApprovalDecided, CancelRequested, ChildFinished, ErrorInfo, Event, RetryRequested, SignalReceived, Start,
    TaskFailed, TaskHeartbeat, TaskStarted, TaskSucceeded, TimerFired,
)
from server.engine.graph import Node
from server.engine.retry import backoff_s, should_retry
from server.engine.state import (
    CANCELLED, COMPENSATED, COMPENSATING, FAILED, PENDING, QUEUED, RETRYING, RUNNING, SKIPPED, STEP_DONE, SUCCEEDED,
    TERMINAL, WAITING, RunState, StepState,
)
from server.errors import ExpressionError

RUN_TIMEOUT = "run-timeout"
ITEMS_SUFFIX = "#items"
LOST_ATTEMPTS = 3  # attempts lost with a replica that are made again beyond the retry policy (Node.replace_lost)
HEARTBEAT_TIMERS = frozenset({"heartbeat", "cheartbeat"})  # `heartbeat:K:attempt`, `cheartbeat:K:attempt`


def decide(state: RunState, event: Event) -> tuple[RunState, list[Command]]:
    decider = _Decider(state, event.at)
    _DISPATCH[type(event)](decider, event)
    return state, decider.out


def new_run(run_id: str, graph: Any) -> RunState:
    return RunState(run_id=run_id, graph=graph)


def approval_id(run_id: str, key: str, attempt: int) -> str:
    """One approval request: a step instance entered for the `attempt`-th time."""
    return f"{run_id}:{key}:{attempt}"


def pending_approvals(state: RunState) -> list[tuple[str, int]]:
    """(step key, request attempt) of every approval the run is waiting for."""
    return [(key, st.attempt) for key, st in state.steps.items()
            if st.status == WAITING and _approval_spec(state.graph.nodes[st.step_id]) is not None]


def started_remote_tasks(state: RunState) -> list[str]:
    """In-flight remote attempts that a worker started (their heartbeat deadline is armed).
    After a restart they are not sent again: their worker still runs them, or the deadline
    finds it dead. The runtime sends each a heartbeat so that the worker gets one full
    interval to report in (its heartbeats may wait in NATS while Baton was down)."""
    return [task_id for task_id, entry in state.tasks.items() if _heartbeat_timer(*entry) in state.timers]


def only_moves_a_heartbeat(event: Event, commands: list[Command]) -> bool:
    """A decision that did nothing but move a heartbeat deadline: a heartbeat, or a
    heartbeat timer that fired after a heartbeat had moved it. Not history (it would
    grow with every heartbeat); replaying the history without them reaches the same
    outcome, since a deadline only ever moves later."""
    if isinstance(event, TaskHeartbeat):
        return True
    return (isinstance(event, TimerFired) and event.timer_id.partition(":")[0] in HEARTBEAT_TIMERS
            and bool(commands) and all(isinstance(c, StartTimer) for c in commands))


def inflight_commands(state: RunState) -> list[Command]:
    """The effects a crash may have cut short: every in-flight task and child start,
    rebuilt from the committed state (rendering is pure, so inputs come out the same).
    The runtime re-dispatches them after a restart: at-least-once, same task ids.
    Remote attempts that a worker started are left out: see started_remote_tasks."""
    d = _Decider(state, state.created_at or 0.0)
    out: list[Command] = []
    for task_id, (key, phase, attempt) in state.tasks.items():
        if _heartbeat_timer(key, phase, attempt) in state.timers:
            continue
        node = d.nodes[key.rpartition("/")[2]]
        ctx = d._ctx(key)
        if phase == "step":
            rendered = node.input.render(ctx) if node.input is not None else None
            out.append(ExecuteTask(task_id, key, node.id, node.step.task, rendered, attempt, node.timeout_s, node.queue,
                                   heartbeat_s=node.heartbeat_s))
        else:
            comp = node.step.compensate
            rendered = node.compensate_input.render(ctx) if node.compensate_input is not None else None
            out.append(ExecuteTask(task_id, key, node.id, comp.task, rendered, attempt, comp.timeout, node.queue,
                                   compensation=True, heartbeat_s=node.heartbeat_s))
    for key in state.children:
        node = d.nodes[key.rpartition("/")[2]]
        ctx = d._ctx(key)
        child_input = node.child_input.render(ctx) if node.child_input is not None else None
        child_wid = node.child_workflow_id.render(ctx) if node.child_workflow_id is not None else None
        out.append(StartChild(key, node.step.workflow.name, child_input, None if child_wid is None else str(child_wid)))
    return out


def prefix_of(key: str) -> str:
    head, sep, _ = key.rpartition("/")
    return head + sep


class _StepsView(Mapping):
    """`steps.<id>` in templates: the innermost scope first, then the enclosing ones."""

    __slots__ = ("_steps", "_prefixes")

    def __init__(self, steps: dict[str, StepState], prefix: str) -> None:
        self._steps = steps
        prefixes = [prefix]
        while prefix:
            prefix = prefix_of(prefix[:-1])
            prefixes.append(prefix)
        self._prefixes = prefixes

    def __getitem__(self, step_id: str) -> dict[str, Any]:
        for prefix in self._prefixes:
            st = self._steps.get(prefix + step_id)
            if st is not None:
                return {"output": st.output, "status": st.status, "error": st.error, "attempt": st.attempt}
        raise KeyError(step_id)

    def __iter__(self) -> Iterator[str]:
        seen = set()
        for prefix in self._prefixes:
            for key in self._steps:
                if prefix_of(key) == prefix and key[len(prefix):] not in seen:
                    seen.add(key[len(prefix):])
                    yield key[len(prefix):]

    def __len__(self) -> int:
        return sum(1 for _ in self)


class _Decider:
    __slots__ = ("s", "nodes", "now", "out")

    def __init__(self, state: RunState, now: float) -> None:
        self.s = state
        self.nodes = state.graph.nodes
        self.now = now
        self.out: list[Command] = []

    # ------------------------------------------------------------------ events

    def on_start(self, ev: Start) -> None:
        s = self.s
        if s.attempt or s.status != QUEUED:
            self.note("start.ignored", None, {"reason": f"run is {s.status}"})
            return
        s.input, s.event, s.workflow_id, s.started_by = ev.input, ev.event, ev.workflow_id, ev.by
        if s.created_at is None:  # a run that waited for a concurrency slot keeps its creation time
            s.created_at = ev.at
        self._begin()

    def on_retry(self, ev: RetryRequested) -> None:
        s = self.s
        if s.status not in (FAILED, COMPENSATED, CANCELLED):
            self.note("retry.ignored", None, {"reason": f"run is {s.status}"})
            return
        for key, st in s.steps.items():
            if st.status not in STEP_DONE or st.compensation is not None:
                # reset, not delete: attempt numbers (and so idempotency keys) never repeat
                st.status, st.output, st.error, st.started_at, st.finished_at = PENDING, None, None, None, None
                st.compensation, st.comp_error, st.items = None, None, None
                st.next_index = st.active = st.done = 0
                self._dirty(key)
        s.completed = [k for k in s.completed if k in s.steps]
        s.error = s.output = s.finished_at = None
        s.comp_queue, s.comp_failed, s.comp_outcome = [], False, COMPENSATED
        self._begin()

    def on_task_succeeded(self, ev: TaskSucceeded) -> None:
        landed = self._land(ev.task_id)
        if landed is None:
            return
        key, phase = landed
        if phase == "step":
            self._succeed(key, ev.output)
        else:
            self._compensation_done(key, None)

    def on_task_failed(self, ev: TaskFailed) -> None:
        landed = self._land(ev.task_id)
        if landed is None:
            return
        key, phase = landed
        if phase == "step":
            self._attempt_failed(key, ev.error, ev.jitter)
        else:
            self._compensation_attempt_failed(key, ev.error, ev.jitter)

    def _land(self, task_id: str) -> tuple[str, str] | None:
        """Take an attempt's outcome out of flight; None (recorded) if it is not in flight."""
        entry = self.s.tasks.pop(task_id, None)
        if entry is None:
            self.note("task.ignored", None, {"task_id": task_id, "reason": "not in flight"})
            return None
        key, phase, attempt = entry
        self._cancel_timer(f"{'timeout' if phase == 'step' else 'ctimeout'}:{key}:{attempt}")
        self._cancel_timer(_heartbeat_timer(key, phase, attempt))
        return key, phase

    def on_task_started(self, ev: TaskStarted) -> None:
        entry = self.s.tasks.get(ev.task_id)
        if entry is None:
            self.note("task.ignored", None, {"task_id": ev.task_id, "reason": "not in flight"})
            return
        self._beat(*entry)

    def on_task_heartbeat(self, ev: TaskHeartbeat) -> None:
        # only for an attempt in flight that a worker said it started; anything else is a
        # late heartbeat, dropped without a note (there may be many)
        entry = self.s.tasks.get(ev.task_id)
        if entry is not None and _heartbeat_timer(*entry) in self.s.timers:
            self._beat(*entry)

    def _beat(self, key: str, phase: str, attempt: int) -> None:
        heartbeat_s = self.nodes[key.rpartition("/")[2]].heartbeat_s
        if heartbeat_s is not None:
            self._start_timer(_heartbeat_timer(key, phase, attempt), self.now + heartbeat_s)

    def on_timer(self, ev: TimerFired) -> None:
        s = self.s
        kind, _, rest = ev.timer_id.partition(":")
        fire_at = s.timers.get(ev.timer_id)
        if kind in HEARTBEAT_TIMERS and fire_at is not None and fire_at > ev.at:
            # it fired, then a heartbeat moved it before this event was decided: still armed
            self.out.append(StartTimer(ev.timer_id, fire_at))
            return
        if s.timers.pop(ev.timer_id, None) is None:
            self.note("timer.ignored", None, {"timer_id": ev.timer_id})
            return
        if kind == RUN_TIMEOUT:
            timeout = s.graph.definition.timeout
            self._fail_run(ErrorInfo("RunTimeout", f"run timed out after {timeout:g}s", False), None)
        elif kind == "retry":
            self._run_task(rest, self.nodes[rest.rpartition("/")[2]])
        elif kind == "cretry":
            self._run_compensation(rest)
        elif kind == "sleep":
            self._succeed(rest, None)
        elif kind == "timeout":
            self._step_timed_out(rest.rpartition(":")[0], int(rest.rpartition(":")[2]), ev.jitter)
        elif kind == "ctimeout":
            self._compensation_timed_out(rest.rpartition(":")[0], int(rest.rpartition(":")[2]), ev.jitter)
        elif kind in HEARTBEAT_TIMERS:
            key, _, attempt = rest.rpartition(":")
            self._heartbeat_lost(key, "step" if kind == "heartbeat" else "compensate", int(attempt), ev.jitter)
        elif kind == "signal":
            self._signal_timed_out(rest)
        elif kind == "approval":
            self._approval_timed_out(rest)

    def on_signal(self, ev: SignalReceived) -> None:
        keys = self.s.signals.pop(ev.name, None)
        if not keys:
            self.note("signal.ignored", None, {"name": ev.name, "reason": "no step is waiting for it"})
            return
        for key in keys:
            self._cancel_timer(f"signal:{key}")
            self._succeed(key, ev.payload)

    def on_approval(self, ev: ApprovalDecided) -> None:
        st = self.s.steps.get(ev.key)
        reason = None
        if st is None or _approval_spec(self.nodes[st.step_id]) is None:
            reason = "no approval step with this key"
        elif st.status != WAITING or st.attempt != ev.attempt:
            reason = f"request {ev.attempt} is not pending (step is {st.status}, request {st.attempt})"
        if reason is not None:
            self.note("approval.ignored", ev.key, {"attempt": ev.attempt, "reason": reason})
            return
        self._cancel_timer(f"approval:{ev.key}")
        by = ev.by or {}
        self._approval_outcome(ev.key, ev.decision, by.get("name"), by.get("via"), ev.comment)

    def on_cancel(self, ev: CancelRequested) -> None:
        if self.s.status in TERMINAL or self.s.status == COMPENSATING:
            self.note("cancel.ignored", None, {"reason": f"run is {self.s.status}"})
            return
        self._fail_run(ErrorInfo("Cancelled", ev.reason, False), None, outcome=CANCELLED)

    def on_child_finished(self, ev: ChildFinished) -> None:
        st = self.s.steps.get(ev.key)
        if st is None or st.status != RUNNING or ev.key not in self.s.children:
            self.note("child.ignored", ev.key, {"status": ev.status})
            return
        self.s.children.remove(ev.key)
        if ev.status == SUCCEEDED:
            self._succeed(ev.key, ev.output)
        else:
            error = ev.error or ErrorInfo("ChildWorkflowFailed", f"child workflow ended {ev.status}", False)
            self._fail_step(ev.key, ErrorInfo(error.type, error.message, False, error.details))

    # --------------------------------------------------------------- starting

    def _begin(self) -> None:
        s = self.s
        s.attempt += 1
        s.status = RUNNING
        self.note("run.running", None, {"attempt": s.attempt})
        if s.graph.definition.timeout is not None:
            self._start_timer(RUN_TIMEOUT, self.now + s.graph.definition.timeout)
        self._open_scope("", s.graph.roots, "")

    def _open_scope(self, scope: str, child_ids: tuple[str, ...], prefix: str) -> None:
        self.s.remaining[scope] = len(child_ids)
        for cid in child_ids:
            if not self.nodes[cid].needs:
                self._start(prefix + cid)
                if self.s.status != RUNNING:
                    return

    def _start(self, key: str) -> None:
        s = self.s
        node = self.nodes[key.rpartition("/")[2]]
        st = s.steps.get(key)
        if st is not None and st.epoch == s.attempt:
            return  # already started in this run attempt
        if st is not None and st.status in STEP_DONE:
            st.epoch = s.attempt  # kept from an earlier run attempt: done without running again
            self._after_done(key, node)
            return
        if st is None:
            st = s.steps[key] = StepState(key, node.id)
        st.epoch = s.attempt
        self._dirty(key)
        if node.when is not None:
            try:
                go = node.when.evaluate(self._ctx(key))
            except ExpressionError as exc:
                self._fail_step(key, ErrorInfo("ExpressionError", f"when: {exc.message}", False))
                return
            if not go:
                st.status, st.finished_at = SKIPPED, self.now
                self.note("step.skipped", key, {"when": node.step.when})
                self._after_done(key, node)
                return
        st.started_at = self.now
        getattr(self, "_start_" + node.kind)(key, node, st)

    def _start_task(self, key: str, node: Node, st: StepState) -> None:
        self._run_task(key, node)

    def _run_task(self, key: str, node: Node) -> None:
        s = self.s
        st = s.steps[key]
        st.attempt += 1
        st.status = RUNNING
        self._dirty(key)
        try:
            rendered = node.input.render(self._ctx(key)) if node.input is not None else None
        except ExpressionError as exc:
            self._fail_step(key, ErrorInfo("ExpressionError", f"input: {exc.message}", False))
            return
        task_id = f"{s.run_id}:{key}:{st.attempt}"
        s.tasks[task_id] = [key, "step", st.attempt]
        self.out.append(ExecuteTask(task_id, key, node.id, node.step.task, rendered, st.attempt,
                                    node.timeout_s, node.queue, heartbeat_s=node.heartbeat_s))
        if node.timeout_s is not None:
            self._start_timer(f"timeout:{key}:{st.attempt}", self.now + node.timeout_s)

    def _start_wait_for_signal(self, key: str, node: Node, st: StepState) -> None:
        spec = node.step.wait_for_signal
        if spec.approval is not None:
            self._request_approval(key, node, st)
            return
        signal = spec.signal or node.id
        st.status = WAITING
        self.s.signals.setdefault(signal, []).append(key)
        self.note("step.waiting", key, {"signal": signal})
        timeout = spec.timeout if spec.timeout is not None else node.timeout_s
        if timeout is not None:
            self._start_timer(f"signal:{key}", self.now + timeout)

    def _request_approval(self, key: str, node: Node, st: StepState) -> None:
        s, spec = self.s, node.step.wait_for_signal.approval
        try:
            message = node.approval_message.render(self._ctx(key)) if node.approval_message is not None else None
        except ExpressionError as exc:
            self._fail_step(key, ErrorInfo("ExpressionError", f"approval.message: {exc.message}", False))
            return
        if message is None:
            message = f"Approve step {key!r} of {s.workflow}?"
        elif not isinstance(message, str):  # `{{ x }}` alone keeps x's type
            message = str(message)
        st.attempt += 1
        st.status = WAITING
        expires_at = self.now + spec.timeout if spec.timeout is not None else None
        self.note("approval.requested", key, {
            "id": approval_id(s.run_id, key, st.attempt), "attempt": st.attempt, "message": message,
            "approvers": list(spec.approvers), "expires_at": expires_at, "on_timeout": spec.on_timeout,
            "on_reject": spec.on_reject,
        })
        if expires_at is not None:
            self._start_timer(f"approval:{key}", expires_at)

    def _approval_outcome(self, key: str, decision: str, name: str | None, via: str | None, comment: str | None) -> None:
        output = {"decision": decision, "by": name, "via": via, "comment": comment, "at": _iso(self.now)}
        spec = _approval_spec(self.nodes[key.rpartition("/")[2]])
        if decision == "approve" or spec.on_reject == "continue":
            self._succeed(key, output)
            return
        who = name or ("the timeout" if via == "timeout" else "a link holder")
        why = f": {comment}" if comment else ""
        self._fail_step(key, ErrorInfo("ApprovalRejected", f"step {key!r} was rejected by {who}{why}", False, output))

    def _start_sleep(self, key: str, node: Node, st: StepState) -> None:
        self._sleep_until(key, st, self.now + node.step.sleep)

    def _start_wait_until(self, key: str, node: Node, st: StepState) -> None:
        try:
            when = _timestamp(node.wait_until.render(self._ctx(key)))
        except (ExpressionError, ValueError) as exc:
            self._fail_step(key, ErrorInfo("ExpressionError", f"wait_until: {exc}", False))
            return
        self._sleep_until(key, st, when)

    def _sleep_until(self, key: str, st: StepState, fire_at: float) -> None:
        if fire_at <= self.now:
            self._succeed(key, None)
            return
        st.status = WAITING
        self.note("step.waiting", key, {"until": fire_at})
        self._start_timer(f"sleep:{key}", fire_at)

    def _start_parallel(self, key: str, node: Node, st: StepState) -> None:
        st.status = RUNNING
        self._container_timeout(key, node)
        self._open_scope(key, node.children, prefix_of(key))

    def _start_map(self, key: str, node: Node, st: StepState) -> None:
        try:
            items = node.items.evaluate(self._ctx(key))
        except ExpressionError as exc:
            self._fail_step(key, ErrorInfo("ExpressionError", f"map.items: {exc.message}", False))
            return
        if not isinstance(items, list):
            self._fail_step(key, ErrorInfo("ExpressionError", f"map.items must be a list, got {type(items).__name__}", False))
            return
        st.status, st.items, st.next_index, st.active, st.done = RUNNING, items, 0, 0, 0
        self._dirty(key + ITEMS_SUFFIX)  # the items are persisted once, in a row of their own
        if not items:
            self._succeed(key, [])
            return
        self._container_timeout(key, node)
        # an iteration may finish at once (all skipped) and start the next one itself
        while st.active < node.step.map.max_concurrency and st.next_index < len(items):
            self._start_iteration(key, node, st)
            if self.s.status != RUNNING or st.status != RUNNING:
                return

    def _start_iteration(self, key: str, node: Node, st: StepState) -> None:
        index = st.next_index
        st.next_index += 1
        st.active += 1
        self._dirty(key)
        self._open_scope(f"{key}[{index}]", node.children, f"{key}[{index}]/")

    def _start_workflow(self, key: str, node: Node, st: StepState) -> None:
        ctx = self._ctx(key)
        try:
            child_input = node.child_input.render(ctx) if node.child_input is not None else None
            child_wid = node.child_workflow_id.render(ctx) if node.child_workflow_id is not None else None
        except ExpressionError as exc:
            self._fail_step(key, ErrorInfo("ExpressionError", f"workflow: {exc.message}", False))
            return
        st.status = RUNNING
        self.s.children.append(key)
        self.out.append(StartChild(key, node.step.workflow.name, child_input, None if child_wid is None else str(child_wid)))
        self._container_timeout(key, node)

    def _container_timeout(self, key: str, node: Node) -> None:
        if node.timeout_s is not None:
            self._start_timer(f"timeout:{key}:0", self.now + node.timeout_s)

    # -------------------------------------------------------------- finishing

    def _succeed(self, key: str, output: Any) -> None:
        st = self.s.steps[key]
        node = self.nodes[st.step_id]
        st.status, st.output, st.error, st.finished_at = SUCCEEDED, output, None, self.now
        self._dirty(key)
        if node.kind in ("parallel", "map", "workflow"):
            self._cancel_timer(f"timeout:{key}:0")
        if node.step.compensate is not None:
            self.s.completed.append(key)
        self._after_done(key, node)

    def _after_done(self, key: str, node: Node) -> None:
        s = self.s
        prefix = prefix_of(key)
        for dep in node.dependents:
            if s.status != RUNNING:
                return
            if all(_done(s.steps.get(prefix + need)) for need in self.nodes[dep].needs):
                self._start(prefix + dep)
        if s.status != RUNNING:
            return
        scope = self._scope_of(key, node)
        left = s.remaining[scope] - 1
        if left:
            s.remaining[scope] = left
            return
        del s.remaining[scope]
        self._scope_closed(scope, prefix)

    def _scope_of(self, key: str, node: Node) -> str:
        if node.container is None:
            return ""
        if self.nodes[node.container].kind == "parallel":
            return prefix_of(key) + node.container
        return prefix_of(key)[:-1]  # `<map key>[i]`

    def _scope_closed(self, scope: str, prefix: str) -> None:
        s = self.s
        if scope == "":
            self._run_succeeded()
            return
        if scope.endswith("]"):
            map_key, _, index = scope.rpartition("[")
            self._iteration_done(map_key)
            return
        node = self.nodes[scope.rpartition("/")[2]]
        outputs = {branch: _output(s.steps.get(prefix + last)) for branch, last in node.last_children.items()}
        self._succeed(scope, outputs)

    def _run_succeeded(self) -> None:
        s = self.s
        if s.graph.output is not None:
            try:
                output = s.graph.output.render(self._ctx(""))
            except ExpressionError as exc:
                self._fail_run(ErrorInfo("ExpressionError", f"output: {exc.message}", False), None)
                return
        else:
            done = [s.steps[r] for r in s.graph.roots if r in s.steps and s.steps[r].status == SUCCEEDED]
            output = done[-1].output if done else None
        self._finish(SUCCEEDED, output)

    def _iteration_done(self, map_key: str) -> None:
        st = self.s.steps[map_key]
        node = self.nodes[st.step_id]
        st.active -= 1
        st.done += 1
        self._dirty(map_key)
        if st.done == len(st.items):
            last = node.last_children[""]
            outputs = [_output(self.s.steps.get(f"{map_key}[{i}]/{last}")) for i in range(len(st.items))]
            self._succeed(map_key, outputs)
        elif st.next_index < len(st.items):
            self._start_iteration(map_key, node, st)

    def _finish(self, status: str, output: Any = None) -> None:
        s = self.s
        s.status, s.output, s.finished_at = status, output, self.now
        for timer_id in list(s.timers):
            self._cancel_timer(timer_id)
        self.out.append(RunFinished(status, output, s.error))

    # ---------------------------------------------------------------- failing

    def _attempt_failed(self, key: str, error: ErrorInfo, jitter: float) -> None:
        st = self.s.steps[key]
        node = self.nodes[st.step_id]
        if should_retry(node.retry, st.attempt, error.type, error.retryable):
            delay = backoff_s(node.retry, st.attempt, jitter)
            st.status, st.error = RETRYING, error.to_dict()
            self._dirty(key)
            self.note("step.retrying", key, {"attempt": st.attempt, "delay_s": round(delay, 3), "error": error.to_dict()})
            self._start_timer(f"retry:{key}", self.now + delay)
        else:
            self._fail_step(key, error)

    def _step_timed_out(self, key: str, attempt: int, jitter: float) -> None:
        st = self.s.steps.get(key)
        if st is None or st.status != RUNNING:
            return
        node = self.nodes[st.step_id]
        error = ErrorInfo("Timeout", f"step {key!r} timed out after {node.timeout_s:g}s", node.kind == "task")
        if node.kind != "task":
            self._fail_step(key, error)
            return
        task_id = f"{self.s.run_id}:{key}:{attempt}"
        if self.s.tasks.pop(task_id, None) is None:
            return
        self._cancel_timer(_heartbeat_timer(key, "step", attempt))
        self.out.append(CancelTask(task_id))
        self._attempt_failed(key, error, jitter)

    def _heartbeat_lost(self, key: str, phase: str, attempt: int, jitter: float) -> None:
        """The worker of a started remote attempt went silent: take it for dead, retry per policy."""
        step = phase == "step"
        task_id = f"{self.s.run_id}:{key}:{attempt}" if step else f"{self.s.run_id}:{key}:compensate:{attempt}"
        if self.s.tasks.pop(task_id, None) is None:
            return
        self._cancel_timer(f"{'timeout' if step else 'ctimeout'}:{key}:{attempt}")
        self.out.append(CancelTask(task_id))
        node = self.nodes[key.rpartition("/")[2]]
        error = ErrorInfo("HeartbeatTimeout", f"no heartbeat from the worker of {task_id} for {node.heartbeat_s:g}s")
        st = self.s.steps[key]
        if step and node.replace_lost and st.attempt < node.retry.max_attempts + LOST_ATTEMPTS:
            st.status, st.error = RETRYING, error.to_dict()
            self._dirty(key)
            self.note("step.retrying", key, {"attempt": st.attempt, "delay_s": 0, "error": error.to_dict(), "lost": True})
            self._start_timer(f"retry:{key}", self.now)
        elif not step and node.replace_lost and st.comp_attempt < node.compensate_retry.max_attempts + LOST_ATTEMPTS:
            # an undo lost with its replica is made again too, whatever its retry policy
            st.comp_error = error.to_dict()
            self._dirty(key)
            self.note("compensation.retrying", key,
                      {"attempt": st.comp_attempt, "delay_s": 0, "error": error.to_dict(), "lost": True})
            self._start_timer(f"cretry:{key}", self.now)
        elif step:
            self._attempt_failed(key, error, jitter)
        else:
            self._compensation_attempt_failed(key, error, jitter)

    def _signal_timed_out(self, key: str) -> None:
        st = self.s.steps.get(key)
        if st is None or st.status != WAITING:
            return
        spec = self.nodes[st.step_id].step.wait_for_signal
        signal = spec.signal or st.step_id
        waiting = self.s.signals.get(signal, [])
        if key in waiting:
            waiting.remove(key)
            if not waiting:
                del self.s.signals[signal]
        if spec.on_timeout == "continue":
            self.note("step.timed_out", key, {"signal": signal, "on_timeout": "continue"})
            self._succeed(key, None)
        else:
            self._fail_step(key, ErrorInfo("SignalTimeout", f"no {signal!r} signal before the timeout", False))

    def _approval_timed_out(self, key: str) -> None:
        st = self.s.steps.get(key)
        if st is None or st.status != WAITING:
            return
        spec = _approval_spec(self.nodes[st.step_id])
        self.note("approval.timed_out", key, {"id": approval_id(self.s.run_id, key, st.attempt),
                                              "on_timeout": spec.on_timeout})
        if spec.on_timeout == "fail":
            self._fail_step(key, ErrorInfo("ApprovalTimeout", f"no decision on step {key!r} before the timeout", False))
        else:
            self._approval_outcome(key, spec.on_timeout, "timeout", "timeout", None)

    def _fail_step(self, key: str, error: ErrorInfo) -> None:
        s = self.s
        st = s.steps[key]
        st.status, st.error, st.finished_at = FAILED, error.to_dict(), self.now
        self._dirty(key)
        self.note("step.failed", key, error.to_dict())
        # the enclosing parallel/map steps fail with it, so the view shows the path
        node = self.nodes[st.step_id]
        outer_key, outer = key, node
        while outer.container is not None:
            outer_key = self._container_key(outer_key, outer)
            outer = self.nodes[outer.container]
            cst = s.steps[outer_key]
            if cst.status == RUNNING:
                cst.status, cst.finished_at = FAILED, self.now
                cst.error = {"type": "StepFailed", "message": f"step {key!r} failed", "retryable": False}
                self._dirty(outer_key)
        if s.status == RUNNING:
            self._fail_run(error, key)

    def _container_key(self, key: str, node: Node) -> str:
        if self.nodes[node.container].kind == "parallel":
            return prefix_of(key) + node.container
        return prefix_of(key)[:-1].rpartition("[")[0]

    def _fail_run(self, error: ErrorInfo, key: str | None, outcome: str = COMPENSATED) -> None:
        s = self.s
        s.error = {**error.to_dict(), "step": key}
        self._halt()
        s.comp_queue = [k for k in reversed(s.completed) if s.steps[k].status == SUCCEEDED and s.steps[k].compensation is None]
        s.comp_outcome = outcome
        if not s.comp_queue:
            self._finish(CANCELLED if outcome == CANCELLED else FAILED)
            return
        s.status = COMPENSATING
        self.note("run.compensating", None, {"steps": list(s.comp_queue)})
        self._run_compensation(s.comp_queue[0])

    def _halt(self) -> None:
        s = self.s
        for task_id, (key, _phase, _attempt) in s.tasks.items():
            self.out.append(CancelTask(task_id))
            self._cancel_step(key)
        s.tasks.clear()
        for timer_id in list(s.timers):
            self._cancel_timer(timer_id)
        for key in s.children:
            self.out.append(CancelChild(key))
            self._cancel_step(key)
        s.children.clear()
        for keys in s.signals.values():
            for key in keys:
                self._cancel_step(key)
        s.signals.clear()
        for key, attempt in pending_approvals(s):
            self.note("approval.cancelled", key, {"id": approval_id(s.run_id, key, attempt)})
        for key, st in s.steps.items():
            if st.status in (RUNNING, WAITING, RETRYING):
                self._cancel_step(key)
        s.remaining.clear()

    def _cancel_step(self, key: str) -> None:
        st = self.s.steps[key]
        if st.status in (RUNNING, WAITING, RETRYING):
            st.status, st.finished_at = CANCELLED, self.now
            self._dirty(key)

    # ----------------------------------------------------------- compensation

    def _run_compensation(self, key: str) -> None:
        s = self.s
        st = s.steps[key]
        node = self.nodes[st.step_id]
        comp = node.step.compensate
        st.compensation = RUNNING
        st.comp_attempt += 1
        self._dirty(key)
        try:
            rendered = node.compensate_input.render(self._ctx(key)) if node.compensate_input is not None else None
        except ExpressionError as exc:
            self._compensation_done(key, ErrorInfo("ExpressionError", f"compensate.input: {exc.message}", False))
            return
        task_id = f"{s.run_id}:{key}:compensate:{st.comp_attempt}"
        s.tasks[task_id] = [key, "compensate", st.comp_attempt]
        self.out.append(ExecuteTask(task_id, key, node.id, comp.task, rendered, st.comp_attempt, comp.timeout,
                                    node.queue, compensation=True, heartbeat_s=node.heartbeat_s))
        if comp.timeout is not None:
            self._start_timer(f"ctimeout:{key}:{st.comp_attempt}", self.now + comp.timeout)

    def _compensation_attempt_failed(self, key: str, error: ErrorInfo, jitter: float) -> None:
        st = self.s.steps[key]
        policy = self.nodes[st.step_id].compensate_retry
        if should_retry(policy, st.comp_attempt, error.type, error.retryable):
            delay = backoff_s(policy, st.comp_attempt, jitter)
            st.comp_error = error.to_dict()
            self._dirty(key)
            self.note("compensation.retrying", key, {"attempt": st.comp_attempt, "delay_s": round(delay, 3), "error": error.to_dict()})
            self._start_timer(f"cretry:{key}", self.now + delay)
        else:
            self._compensation_done(key, error)

    def _compensation_timed_out(self, key: str, attempt: int, jitter: float) -> None:
        task_id = f"{self.s.run_id}:{key}:compensate:{attempt}"
        if self.s.tasks.pop(task_id, None) is None:
            return
        self._cancel_timer(_heartbeat_timer(key, "compensate", attempt))
        self.out.append(CancelTask(task_id))
        timeout = self.nodes[key.rpartition("/")[2]].step.compensate.timeout
        self._compensation_attempt_failed(key, ErrorInfo("Timeout", f"compensation timed out after {timeout:g}s"), jitter)

    def _compensation_done(self, key: str, error: ErrorInfo | None) -> None:
        s = self.s
        st = s.steps[key]
        if error is None:
            st.compensation, st.comp_error = SUCCEEDED, None
            self.note("compensation.succeeded", key, {"attempt": st.comp_attempt})
        else:
            st.compensation, st.comp_error = FAILED, error.to_dict()
            s.comp_failed = True
            self.note("compensation.failed", key, error.to_dict())
        self._dirty(key)
        s.comp_queue.pop(0)
        if s.comp_queue:
            self._run_compensation(s.comp_queue[0])
        else:
            self._finish(FAILED if s.comp_failed else s.comp_outcome)

    # ---------------------------------------------------------------- helpers

    def _ctx(self, key: str) -> dict[str, Any]:
        s = self.s
        prefix = prefix_of(key)
        ctx: dict[str, Any] = {
            "input": s.input, "event": s.event, "steps": _StepsView(s.steps, prefix),
            "run": {"id": s.run_id, "workflow": s.workflow, "version": s.version,
                    "workflow_id": s.workflow_id, "attempt": s.attempt, "started_by": s.started_by},
        }
        if prefix:  # inside a map iteration: `item` and `index` of the innermost one
            map_key, _, index = prefix[:-1].rpartition("[")
            ctx["index"] = int(index.rstrip("]"))
            ctx["item"] = s.steps[map_key].items[ctx["index"]]
        return ctx

    def _start_timer(self, timer_id: str, fire_at: float) -> None:
        self.s.timers[timer_id] = fire_at
        self.out.append(StartTimer(timer_id, fire_at))

    def _cancel_timer(self, timer_id: str) -> None:
        if self.s.timers.pop(timer_id, None) is not None:
            self.out.append(CancelTimer(timer_id))

    def _dirty(self, key: str) -> None:
        self.s.dirty.add(key)

    def note(self, type_: str, key: str | None, data: Any) -> None:
        self.out.append(Record(type_, key, data))


def _heartbeat_timer(key: str, phase: str, attempt: int) -> str:
    return f"{'heartbeat' if phase == 'step' else 'cheartbeat'}:{key}:{attempt}"


def _approval_spec(node: Node) -> Any:
    spec = node.step.wait_for_signal
    return None if spec is None else spec.approval


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _done(st: StepState | None) -> bool:
    return st is not None and st.status in STEP_DONE


def _output(st: StepState | None) -> Any:
    return None if st is None else st.output


def _timestamp(value: Any) -> float:
    """Unix seconds from a number or an ISO 8601 string (naive means UTC)."""
    if isinstance(value, bool):
        raise ValueError(f"not a timestamp: {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=timezone.utc)
        return parsed.timestamp()
    raise ValueError(f"not a timestamp: {value!r}")


_DISPATCH = {
    Start: _Decider.on_start,
    RetryRequested: _Decider.on_retry,
    TaskSucceeded: _Decider.on_task_succeeded,
    TaskFailed: _Decider.on_task_failed,
    TaskStarted: _Decider.on_task_started,
    TaskHeartbeat: _Decider.on_task_heartbeat,
    TimerFired: _Decider.on_timer,
    SignalReceived: _Decider.on_signal,
    ApprovalDecided: _Decider.on_approval,
    CancelRequested: _Decider.on_cancel,
    ChildFinished: _Decider.on_child_finished,
}

__all__ = ["approval_id", "decide", "inflight_commands", "new_run", "only_moves_a_heartbeat", "pending_approvals",
           "prefix_of", "started_remote_tasks", "RUN_TIMEOUT"]
