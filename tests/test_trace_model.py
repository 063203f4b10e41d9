"""The pure history -> spans reducer (server/telemetry/trace.py), row by row."""

from __future__ import annotations

from server.definitions.loader import load_workflow_text
from server.telemetry.ids import run_span_id, span_id, task_span_id
from server.telemetry.trace import RunTrace

WF = """
name: etl
steps:
  - id: parts
    map:
      items: "[1, 2]"
      steps: [{id: load, task: echo, timeout: 5s, retry: {max_attempts: 2}}]
  - {id: nap, sleep: 1h}
  - {id: gate, wait_for_signal: {approval: {message: ok?}}}
"""
R = "r1"


def trace(**kw) -> RunTrace:
    loaded = load_workflow_text(WF, "etl.yaml")
    return RunTrace(R, loaded.compiled, workflow="etl", version="1", **kw)


def rows(*items):
    return [(i + 1, at, type_, key, data) for i, (at, type_, key, data) in enumerate(items)]


def test_map_items_hang_under_the_map_and_a_timeout_closes_the_attempt_with_an_error():
    t = trace()
    closed = t.feed(rows(
        (1.0, "run.started", None, {"by": "me"}),
        (1.0, "step.scheduled", "parts[0]/load", {"task_id": f"{R}:parts[0]/load:1", "attempt": 1, "handler": "echo"}),
        (1.0, "step.scheduled", "parts[1]/load", {"task_id": f"{R}:parts[1]/load:1", "attempt": 1, "handler": "echo"}),
        (2.0, "task.succeeded", "parts[1]/load", {"task_id": f"{R}:parts[1]/load:1"}),
        (6.0, "timer.fired", None, {"timer_id": "timeout:parts[0]/load:1"}),
        (6.0, "step.retrying", "parts[0]/load", {"attempt": 1, "delay_s": 1.5}),
    ))
    by_name = {(s.name, s.attributes.get("baton.step.key")): s for s in closed}
    timed_out = by_name[("step load", "parts[0]/load")]
    assert timed_out.status == "error" and timed_out.end == 6.0
    assert [e[0] for e in timed_out.events] == ["timeout", "retry scheduled"]
    assert timed_out.events[1][2] == {"baton.retry.delay_s": 1.5}
    container = t.containers["parts"]
    assert {s.parent_id for s in closed} == {container.span_id}
    assert container.parent_id == run_span_id(R, 1) and container.name == "step parts"
    assert container.end == 6.0 and container.status == "error"


def test_a_map_whose_run_succeeded_ends_ok_and_one_whose_run_failed_does_not():
    ends = {}
    for status in ("succeeded", "failed"):
        t = trace()
        closed = t.feed(rows(
            (1.0, "run.started", None, {}),
            (1.0, "step.scheduled", "parts[0]/load", {"task_id": f"{R}:parts[0]/load:1", "attempt": 1, "handler": "echo"}),
            (2.0, "task.succeeded", "parts[0]/load", {"task_id": f"{R}:parts[0]/load:1"}),
            (3.0, f"run.{status}", None, {"error": {"type": "X", "message": "no"}} if status == "failed" else {}),
        ))
        ends[status] = next(s.status for s in closed if s.name == "step parts")
    assert ends == {"succeeded": "ok", "failed": "unset"}


def test_waits_are_spans_that_close_with_what_ended_them():
    t = trace()
    t.feed(rows((1.0, "run.started", None, {})))
    closed = t.feed([
        (2, 2.0, "step.waiting", "nap", {"until": 3602.0}),
        (3, 3602.0, "timer.fired", None, {"timer_id": "sleep:nap"}),
        (4, 3602.0, "approval.requested", "gate", {"attempt": 1}),
        (5, 3700.0, "approval.decided", "gate", {"decision": "approve", "by": {"name": "alice", "via": "link"}}),
    ])
    nap, gate = closed
    assert (nap.name, nap.start, nap.end, nap.status) == ("sleep nap", 2.0, 3602.0, "ok")
    assert (gate.name, gate.end, gate.status) == ("approval gate", 3700.0, "ok")
    assert gate.events == [("approval decided", 3700.0, {"baton.approval.decision": "approve", "baton.approval.by": "alice",
                                                         "baton.approval.via": "link"})]


def test_rows_fed_twice_count_once_and_a_run_retry_is_a_second_run_span():
    t = trace()
    first = rows((1.0, "run.started", None, {}),
                 (1.0, "step.scheduled", "nap", {"task_id": f"{R}:x:1", "attempt": 1}),
                 (2.0, "run.failed", None, {"error": {"type": "Boom", "message": "no"}}))
    closed = t.feed(first)
    assert [s.name for s in closed] == ["step nap", "run etl"]  # the open attempt ends with the run
    assert closed[1].status == "error" and closed[1].message == "Boom: no"
    assert t.feed(first) == []  # replayed rows are skipped
    closed = t.feed([(4, 5.0, "run.retry_requested", None, {"by": "bob"}), (5, 6.0, "run.succeeded", None, {})])
    (again,) = closed
    assert again.span_id == run_span_id(R, 2) and again.attributes["baton.run.attempt"] == 2 and again.status == "ok"


def test_the_triggers_traceparent_is_the_parent_or_a_link():
    event = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    child = trace(event=event)
    child.feed(rows((1.0, "run.started", None, {})))
    assert child.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736" and child.run.parent_id == "00f067aa0ba902b7"
    linked = trace(event=event, link_trigger=True)
    linked.feed(rows((1.0, "run.started", None, {})))
    assert linked.run.parent_id is None and linked.run.attributes["baton.trigger.span_id"] == "00f067aa0ba902b7"


def test_span_ids_are_stable_and_distinct():
    assert task_span_id(f"{R}:a:1") == task_span_id(f"{R}:a:1") != task_span_id(f"{R}:a:2")
    assert len(span_id("x")) == 16 and run_span_id(R, 1) != run_span_id(R, 2)
