"""Approval steps in the pure engine: plain synchronous functions, no I/O."""

from __future__ import annotations

import orjson
import pytest
from pydantic import ValidationError

from server.definitions.models import Workflow
from server.engine.commands import CancelTimer, StartTimer
from server.engine.decide import decide, new_run, pending_approvals
from server.engine.events import (
    ApprovalDecided, CancelRequested, RetryRequested, SignalReceived, event_from_dict, event_to_dict,
)
from tests.enginesim import Sim, workflow

ALICE = {"name": "alice", "via": "token"}


def gated(approval: dict | None = None, **gate_extra) -> list[dict]:
    return [
        {"id": "build", "task": "noop", "compensate": {"task": "undo"}},
        {"id": "gate", "wait_for_signal": {"approval": approval if approval is not None else {}}, **gate_extra},
        {"id": "deploy", "task": "noop", "input": {"by": "{{ steps.gate.output.by }}",
                                                   "decision": "{{ steps.gate.output.decision }}"}},
    ]


def at_gate(approval: dict | None = None, input=None, **kw) -> Sim:  # noqa: ANN001
    sim = Sim(workflow(gated(approval)), **kw)
    sim.start(input, by="ops-bot")
    sim.succeed("build", {"image": "api:1.4.2"})
    return sim


def decide_gate(sim: Sim, decision: str, attempt: int = 1, by=ALICE, comment: str | None = None):  # noqa: ANN001
    return sim.apply(ApprovalDecided("gate", attempt, decision, sim.now, by, comment))


def test_entering_an_approval_waits_and_notes_the_request():
    sim = at_gate({"message": "Deploy {{ input.service }} ({{ steps.build.output.image }}) for {{ run.started_by }}?",
                   "approvers": ["alice", "release-managers"], "timeout": "4h"},
                  input={"service": "api"}, run_id="r9")
    assert sim.state.steps["gate"].status == "waiting"
    assert sim.state.steps["gate"].attempt == 1
    (note,) = sim.records("approval.requested")
    assert note.key == "gate"
    assert note.data == {"id": "r9:gate:1", "attempt": 1, "message": "Deploy api (api:1.4.2) for ops-bot?",
                         "approvers": ["alice", "release-managers"], "expires_at": sim.now + 4 * 3600,
                         "on_timeout": "reject", "on_reject": "fail"}
    assert StartTimer("approval:gate", sim.now + 4 * 3600) in sim.commands
    assert pending_approvals(sim.state) == [("gate", 1)]
    assert not sim.state.signals  # only a decision ends it, never a signal


def test_default_message_and_no_timeout_means_no_timer():
    sim = at_gate()
    (note,) = sim.records("approval.requested")
    assert note.data["message"] == "Approve step 'gate' of wf?"
    assert note.data["expires_at"] is None
    assert not [t for t in sim.timers_started() if t.timer_id.startswith("approval:")]


def test_a_plain_signal_cannot_decide_an_approval():
    sim = at_gate()
    sim.apply(SignalReceived("gate", sim.now, {"ok": True}))
    sim.apply(SignalReceived("approve", sim.now, {"ok": True}))
    assert sim.state.steps["gate"].status == "waiting"
    assert len(sim.records("signal.ignored")) == 2


def test_approve_succeeds_the_step_with_the_decision_as_output():
    sim = at_gate({"timeout": "1h"})
    sim.now += 60
    out = decide_gate(sim, "approve", comment="ship it")
    assert CancelTimer("approval:gate") in out
    gate = sim.state.steps["gate"]
    assert gate.status == "succeeded"
    assert gate.output == {"decision": "approve", "by": "alice", "via": "token", "comment": "ship it",
                           "at": "1970-01-01T00:17:40.000Z"}
    assert sim.task("deploy").input == {"by": "alice", "decision": "approve"}
    assert pending_approvals(sim.state) == []


def test_reject_fails_the_step_not_retried_and_the_run_compensates():
    sim = at_gate()
    decide_gate(sim, "reject", by={"name": None, "via": "link"}, comment="not on a Friday")
    gate = sim.state.steps["gate"]
    assert gate.status == "failed"
    assert gate.error["type"] == "ApprovalRejected" and gate.error["retryable"] is False
    assert "a link holder: not on a Friday" in gate.error["message"]
    assert gate.error["details"]["comment"] == "not on a Friday"
    assert sim.state.status == "compensating"
    sim.succeed("build", compensation=True)
    assert sim.state.status == "compensated"
    assert sim.state.error["step"] == "gate"


def test_reject_with_on_reject_continue_lets_later_steps_branch():
    steps = [
        {"id": "gate", "wait_for_signal": {"approval": {"on_reject": "continue"}}},
        {"id": "deploy", "task": "noop", "when": "steps.gate.output.decision == 'approve'"},
        {"id": "report", "task": "noop"},
    ]
    sim = Sim(workflow(steps))
    sim.start()
    decide_gate(sim, "reject", comment="no")
    assert sim.state.steps["gate"].status == "succeeded"
    assert sim.state.steps["gate"].output["decision"] == "reject"
    assert sim.state.steps["deploy"].status == "skipped"
    sim.succeed("report")
    assert sim.state.status == "succeeded"


def test_a_second_decision_or_one_for_another_request_is_ignored_and_noted():
    sim = at_gate()
    decide_gate(sim, "approve", attempt=2)
    assert sim.state.steps["gate"].status == "waiting"
    decide_gate(sim, "approve")
    decide_gate(sim, "reject")
    assert sim.state.steps["gate"].status == "succeeded"
    ignored = sim.records("approval.ignored")
    assert [r.data["attempt"] for r in ignored] == [2, 1]
    assert "not pending" in ignored[1].data["reason"]
    sim.apply(ApprovalDecided("build", 1, "approve", sim.now))
    assert sim.records("approval.ignored")[-1].data["reason"] == "no approval step with this key"


@pytest.mark.parametrize("on_timeout, status, outcome", [
    ("reject", "compensating", "ApprovalRejected"),
    ("approve", "running", None),
    ("fail", "compensating", "ApprovalTimeout"),
])
def test_the_timeout_decides_per_on_timeout(on_timeout, status, outcome):
    sim = at_gate({"timeout": 30, "on_timeout": on_timeout})
    sim.advance(29)
    assert sim.state.steps["gate"].status == "waiting"
    sim.advance(1)
    (note,) = sim.records("approval.timed_out")
    assert note.data == {"id": "r1:gate:1", "on_timeout": on_timeout}
    assert sim.state.status == status
    gate = sim.state.steps["gate"]
    if outcome is None:
        assert gate.output["by"] == "timeout" and gate.output["via"] == "timeout"
        assert sim.task("deploy").input == {"by": "timeout", "decision": "approve"}
    else:
        assert gate.error["type"] == outcome
    decide_gate(sim, "approve")  # a person too late changes nothing
    assert sim.records("approval.ignored")


def test_cancelling_the_run_drops_the_request():
    sim = at_gate({"timeout": "1h"})
    out = sim.apply(CancelRequested(sim.now, "changed my mind"))
    (note,) = sim.records("approval.cancelled")
    assert note.data == {"id": "r1:gate:1"} and note.key == "gate"
    assert CancelTimer("approval:gate") in out
    assert sim.state.steps["gate"].status == "cancelled"
    assert pending_approvals(sim.state) == []


def test_a_retried_run_asks_again_with_a_new_request_and_the_old_one_stays_dead():
    sim = at_gate()
    decide_gate(sim, "reject")
    sim.succeed("build", compensation=True)
    assert sim.state.status == "compensated"
    sim.apply(RetryRequested(sim.now))
    sim.succeed("build", {"image": "api:1.4.3"})  # it was compensated: it runs again
    assert pending_approvals(sim.state) == [("gate", 2)]
    assert [r.data["id"] for r in sim.records("approval.requested")] == ["r1:gate:1", "r1:gate:2"]
    decide_gate(sim, "approve", attempt=1)
    assert sim.state.steps["gate"].status == "waiting"
    decide_gate(sim, "approve", attempt=2)
    assert sim.state.steps["gate"].status == "succeeded"


def test_a_message_that_fails_to_render_fails_the_step():
    sim = at_gate({"message": "deploy {{ input.nope }}"}, input={})
    gate = sim.state.steps["gate"]
    assert gate.status == "failed" and gate.error["type"] == "ExpressionError"
    assert "approval.message" in gate.error["message"]
    assert not sim.records("approval.requested")


def test_approvals_in_map_iterations_have_their_own_requests():
    steps = [{"id": "each", "map": {"items": "input.envs", "steps": [
        {"id": "ok", "wait_for_signal": {"approval": {"message": "promote to {{ item }}?"}}}]}}]
    sim = Sim(workflow(steps))
    sim.start({"envs": ["staging", "prod"]})
    notes = sim.records("approval.requested")
    assert [(n.key, n.data["message"]) for n in notes] == [("each[0]/ok", "promote to staging?"),
                                                           ("each[1]/ok", "promote to prod?")]
    sim.apply(ApprovalDecided("each[1]/ok", 1, "approve", sim.now, ALICE))
    sim.apply(ApprovalDecided("each[0]/ok", 1, "approve", sim.now, ALICE))
    assert sim.state.status == "succeeded"
    assert [o["decision"] for o in sim.state.output] == ["approve", "approve"]


def test_replaying_the_stored_history_rebuilds_the_same_state():
    sim = at_gate({"timeout": 100, "on_timeout": "approve"}, input={"service": "api"})
    decide_gate(sim, "approve", attempt=3)  # ignored
    decide_gate(sim, "reject", by={"name": "bob", "via": "link"}, comment="wait")
    sim.succeed("build", compensation=True)
    sim.apply(RetryRequested(sim.now))
    sim.succeed("build")
    sim.advance(100)  # the timeout approves
    sim.succeed("deploy")
    assert sim.state.status == "succeeded"
    replayed = new_run(sim.state.run_id, sim.state.graph)
    for event in sim.events:
        decide(replayed, event_from_dict(event.type, orjson.loads(orjson.dumps(event_to_dict(event)))))
    assert replayed.view() == sim.state.view()
    assert replayed.started_by == "ops-bot"


# ---------------------------------------------------------------- the language


def test_an_approval_takes_its_own_timeout_not_the_signal_wait_s():
    base = {"name": "wf", "steps": [{"id": "gate", "wait_for_signal": {"approval": {}}}]}
    Workflow.model_validate(base)
    for extra in ({"timeout": "1h"}, {"on_timeout": "continue"}, {"signal": "approve"}):
        bad = {"name": "wf", "steps": [{"id": "gate", "wait_for_signal": {"approval": {}, **extra}}]}
        with pytest.raises(ValidationError, match="approval"):
            Workflow.model_validate(bad)
    with pytest.raises(ValidationError, match="approval.timeout"):
        Workflow.model_validate({"name": "wf", "steps": [{"id": "gate", "timeout": 5, "wait_for_signal": {"approval": {}}}]})
    with pytest.raises(ValidationError, match="on_timeout"):
        Workflow.model_validate({"name": "wf", "steps": [{"id": "g", "wait_for_signal": {"approval": {"on_timeout": "continue"}}}]})
    with pytest.raises(ValidationError, match="approvers"):
        Workflow.model_validate({"name": "wf", "steps": [{"id": "g", "wait_for_signal": {"approval": {"approvers": ["no spaces"]}}}]})


def test_a_plain_signal_wait_without_a_name_waits_for_its_step_id():
    sim = Sim(workflow([{"id": "ready", "wait_for_signal": {"timeout": 10}}]))
    sim.start()
    assert sim.state.waiting_for("ready")
    sim.apply(SignalReceived("ready", sim.now, 1))
    assert sim.state.status == "succeeded"
