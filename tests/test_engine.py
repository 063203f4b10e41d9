"""The pure engine, one behaviour per test. Plain synchronous functions, no I/O."""

from __future__ import annotations

import ast
import pathlib

import pytest

from server.engine.commands import CancelChild, CancelTask, ExecuteTask, StartChild, StartTimer
from server.engine.events import (
    CancelRequested, ChildFinished, ErrorInfo, RetryRequested, SignalReceived, TaskSucceeded, TimerFired,
)
from tests.enginesim import Sim, workflow

FAST_RETRY = {"max_attempts": 3, "initial_delay": 1, "multiplier": 2, "max_delay": 60, "jitter": 0.5}


def chain(*ids, **step_extra):
    return [{"id": i, "task": "noop", **step_extra} for i in ids]


# ------------------------------------------------------------------ scheduling

def test_list_order_means_each_step_needs_the_previous_one():
    sim = Sim(workflow(chain("a", "b", "c")))
    sim.start()
    assert [t.key for t in sim.inflight()] == ["a"]
    sim.succeed("a", 1)
    assert [t.key for t in sim.inflight()] == ["b"]
    sim.succeed("b", 2)
    sim.succeed("c", 3)
    assert sim.state.status == "succeeded"
    assert sim.finished().output == 3
    assert sim.executed() == ["a", "b", "c"]


def test_task_gets_idempotency_key_run_step_attempt():
    sim = Sim(workflow(chain("a")), run_id="run-7")
    sim.start()
    assert sim.task("a").task_id == "run-7:a:1"
    assert sim.task("a").attempt == 1


def test_needs_builds_a_diamond():
    steps = [
        {"id": "a", "task": "noop"},
        {"id": "b", "task": "noop", "needs": ["a"]},
        {"id": "c", "task": "noop", "needs": ["a"]},
        {"id": "d", "task": "noop", "needs": ["b", "c"]},
    ]
    sim = Sim(workflow(steps))
    sim.start()
    sim.succeed("a")
    assert sorted(t.key for t in sim.inflight()) == ["b", "c"]
    sim.succeed("b")
    assert [t.key for t in sim.inflight()] == ["c"]
    sim.succeed("c")
    assert [t.key for t in sim.inflight()] == ["d"]


def test_empty_needs_start_at_once():
    steps = [{"id": "a", "task": "noop"}, {"id": "b", "task": "noop", "needs": []}]
    sim = Sim(workflow(steps))
    sim.start()
    assert sorted(t.key for t in sim.inflight()) == ["a", "b"]


def test_input_template_sees_input_and_earlier_outputs():
    steps = [
        {"id": "a", "task": "noop", "input": {"n": "{{ input.n }}"}},
        {"id": "b", "task": "noop", "input": {"total": "{{ steps.a.output.v + input.n }}", "msg": "run {{ run.id }}"}},
    ]
    sim = Sim(workflow(steps), run_id="R")
    sim.start({"n": 2})
    assert sim.task("a").input == {"n": 2}
    sim.succeed("a", {"v": 40})
    assert sim.task("b").input == {"total": 42, "msg": "run R"}


def test_input_template_error_fails_step_without_retry():
    steps = [{"id": "a", "task": "noop", "input": "{{ input.missing }}", "retry": FAST_RETRY}]
    sim = Sim(workflow(steps))
    sim.start({})
    assert sim.state.status == "failed"
    assert sim.state.steps["a"].error["type"] == "ExpressionError"
    assert "missing" in sim.state.steps["a"].error["message"]


# ------------------------------------------------------------------ conditions

def test_false_when_skips_step_and_dependents_still_run():
    steps = [
        {"id": "a", "task": "noop", "when": "input.go"},
        {"id": "b", "task": "noop", "input": "{{ steps.a.status }}"},
    ]
    sim = Sim(workflow(steps))
    sim.start({"go": False})
    assert sim.state.steps["a"].status == "skipped"
    assert sim.task("b").input == "skipped"
    assert len(sim.records("step.skipped")) == 1


def test_when_sees_outputs_of_earlier_steps():
    steps = [
        {"id": "check", "task": "noop"},
        {"id": "high", "task": "noop", "when": "steps.check.output.severity == 'high'"},
        {"id": "done", "task": "noop"},
    ]
    sim = Sim(workflow(steps))
    sim.start()
    sim.succeed("check", {"severity": "low"})
    assert sim.state.steps["high"].status == "skipped"
    sim.succeed("done")
    assert sim.state.status == "succeeded"


def test_when_error_fails_the_step():
    sim = Sim(workflow([{"id": "a", "task": "noop", "when": "input.nope > 1"}]))
    sim.start({})
    assert sim.state.status == "failed"
    assert sim.state.steps["a"].error["message"].startswith("when:")


# -------------------------------------------------------------------- retries

def test_retries_back_off_exponentially_then_fail():
    sim = Sim(workflow(chain("a", retry=FAST_RETRY)))
    sim.start()
    sim.fail("a")
    timer = [t for t in sim.timers_started() if t.timer_id == "retry:a"][-1]
    assert timer.fire_at == sim.now + 1.0
    assert sim.state.steps["a"].status == "retrying"
    sim.advance(1.0)
    assert sim.task("a").attempt == 2
    sim.fail("a")
    assert [t for t in sim.timers_started() if t.timer_id == "retry:a"][-1].fire_at == sim.now + 2.0
    sim.advance(2.0)
    sim.fail("a")
    assert sim.state.steps["a"].status == "failed"
    assert sim.state.status == "failed"
    assert len(sim.records("step.retrying")) == 2


def test_retry_succeeds_on_a_later_attempt():
    sim = Sim(workflow(chain("a", "b", retry=FAST_RETRY)))
    sim.start()
    sim.fail("a")
    sim.advance(1.0)
    sim.succeed("a", "ok")
    assert sim.state.steps["a"].attempt == 2
    assert sim.state.steps["a"].error is None
    assert [t.key for t in sim.inflight()] == ["b"]


@pytest.mark.parametrize("jitter,expected", [(0.0, 0.5), (0.5, 1.0), (0.999, 1.499)])
def test_jitter_spreads_delay_within_bounds(jitter, expected):
    policy = {**FAST_RETRY, "jitter": 0.5}
    sim = Sim(workflow(chain("a", retry=policy)))
    sim.start()
    sim.fail("a", jitter=jitter)
    assert sim.state.timers["retry:a"] - sim.now == pytest.approx(expected)


def test_max_delay_caps_backoff():
    policy = {"max_attempts": 10, "initial_delay": 10, "multiplier": 10, "max_delay": 30, "jitter": 0}
    sim = Sim(workflow(chain("a", retry=policy)))
    sim.start()
    for _ in range(3):
        sim.fail("a")
        delay = sim.state.timers["retry:a"] - sim.now
        sim.advance(delay)
    assert delay == 30


def test_non_retryable_error_type_is_not_retried():
    sim = Sim(workflow(chain("a", retry={**FAST_RETRY, "non_retryable": ["ValueError"]})))
    sim.start()
    sim.fail("a", type_="ValueError")
    assert sim.state.status == "failed"


def test_handler_non_retryable_error_is_not_retried():
    sim = Sim(workflow(chain("a", retry=FAST_RETRY)))
    sim.start()
    sim.fail("a", retryable=False)
    assert sim.state.steps["a"].attempt == 1
    assert sim.state.status == "failed"


def test_workflow_defaults_apply_to_steps():
    sim = Sim(workflow(chain("a"), defaults={"retry": FAST_RETRY}))
    sim.start()
    sim.fail("a")
    assert sim.state.steps["a"].status == "retrying"


# ------------------------------------------------------------------- timeouts

def test_step_timeout_cancels_attempt_retries_and_ignores_late_result():
    sim = Sim(workflow(chain("a", timeout="10s", retry=FAST_RETRY)))
    sim.start()
    first = sim.task("a")
    out = sim.advance(10)
    assert CancelTask(first.task_id) in out
    assert sim.state.steps["a"].error["type"] == "Timeout"
    sim.advance(1)
    second = sim.task("a")
    assert second.attempt == 2
    sim.apply(TaskSucceeded(first.task_id, sim.now, "late"))
    assert sim.records("task.ignored")
    assert sim.state.steps["a"].status == "running"
    sim.succeed("a", "ok")
    assert sim.state.status == "succeeded" and sim.finished().output == "ok"


def test_result_before_timeout_cancels_the_timer():
    sim = Sim(workflow(chain("a", timeout=5)))
    sim.start()
    sim.succeed("a")
    assert sim.state.timers == {}


def test_run_timeout_fails_run_and_compensates():
    steps = [
        {"id": "a", "task": "noop", "compensate": {"task": "undo"}},
        {"id": "b", "wait_for_signal": {"signal": "go"}},
    ]
    sim = Sim(workflow(steps, timeout="1h"))
    sim.start()
    sim.succeed("a")
    sim.advance(3600)
    assert sim.state.status == "compensating"
    assert sim.state.error["type"] == "RunTimeout"
    assert sim.state.steps["b"].status == "cancelled"
    sim.succeed("a", compensation=True)
    assert sim.state.status == "compensated"


# -------------------------------------------------------------- signals, time

def test_signal_resumes_waiting_step_with_payload():
    steps = [{"id": "approve", "wait_for_signal": {"signal": "approve"}}, {"id": "deploy", "task": "noop", "input": "{{ steps.approve.output.by }}"}]
    sim = Sim(workflow(steps))
    sim.start()
    assert sim.state.waiting_for("approve")
    assert sim.state.steps["approve"].status == "waiting"
    sim.apply(SignalReceived("approve", sim.now, {"by": "alice"}))
    assert sim.task("deploy").input == "alice"
    assert not sim.state.waiting_for("approve")


def test_signal_nobody_waits_for_changes_nothing():
    sim = Sim(workflow(chain("a")))
    sim.start()
    before = sim.state.view()
    sim.apply(SignalReceived("approve", sim.now, {}))
    assert sim.state.view() == before
    assert sim.records("signal.ignored")


@pytest.mark.parametrize("on_timeout,status", [("fail", "failed"), ("continue", "succeeded")])
def test_signal_timeout(on_timeout, status):
    steps = [{"id": "w", "wait_for_signal": {"signal": "go", "timeout": "4h", "on_timeout": on_timeout}}]
    sim = Sim(workflow(steps))
    sim.start()
    sim.advance(4 * 3600 - 1)
    assert sim.state.status == "running"
    sim.advance(1)
    assert sim.state.status == status
    assert not sim.state.waiting_for("go")


def test_sleep_is_a_durable_timer():
    sim = Sim(workflow([{"id": "nap", "sleep": "5m"}, {"id": "b", "task": "noop"}]))
    sim.start()
    assert sim.state.timers == {"sleep:nap": sim.now + 300}
    assert sim.inflight() == []
    sim.advance(300)
    assert [t.key for t in sim.inflight()] == ["b"]


@pytest.mark.parametrize("until", ["{{ input.at }}", "2001-09-09T01:46:40Z"])
def test_wait_until_timestamp(until):
    sim = Sim(workflow([{"id": "w", "wait_until": until}]), now=999_000_000.0)
    sim.start({"at": 1_000_000_000})
    assert sim.state.timers == {"sleep:w": 1_000_000_000.0}


def test_wait_until_in_the_past_goes_on_at_once():
    sim = Sim(workflow([{"id": "w", "wait_until": "2000-01-01T00:00:00"}, {"id": "b", "task": "noop"}]), now=2e9)
    sim.start()
    assert [t.key for t in sim.inflight()] == ["b"]


def test_stale_timer_changes_nothing():
    sim = Sim(workflow(chain("a")))
    sim.start()
    before = sim.state.view()
    sim.apply(TimerFired("sleep:a", sim.now))
    assert sim.state.view() == before


# ------------------------------------------------------------- parallel, map

PARALLEL = [
    {"id": "p", "parallel": {
        "left": [{"id": "l1", "task": "noop"}, {"id": "l2", "task": "noop"}],
        "right": [{"id": "r1", "task": "noop"}],
    }},
    {"id": "after", "task": "noop", "input": "{{ steps.p.output }}"},
]


def test_parallel_branches_fan_out_and_in():
    sim = Sim(workflow(PARALLEL))
    sim.start()
    assert sorted(t.key for t in sim.inflight()) == ["l1", "r1"]
    sim.succeed("r1", "R")
    sim.succeed("l1", "L1")
    assert [t.key for t in sim.inflight()] == ["l2"]
    sim.succeed("l2", "L2")
    assert sim.task("after").input == {"left": "L2", "right": "R"}


def test_parallel_failure_cancels_the_other_branches():
    sim = Sim(workflow(PARALLEL))
    sim.start()
    r1 = sim.task("r1")
    out = sim.fail("l1", retryable=False)
    assert CancelTask(r1.task_id) in out
    assert sim.state.steps["r1"].status == "cancelled"
    assert sim.state.steps["p"].status == "failed"
    assert sim.state.status == "failed"
    sim.apply(TaskSucceeded(r1.task_id, sim.now, "late"))
    assert sim.state.steps["r1"].status == "cancelled"


def map_wf(limit=2):
    return workflow([
        {"id": "m", "map": {"items": "input.parts", "max_concurrency": limit, "steps": [
            {"id": "ex", "task": "extract", "input": {"part": "{{ item }}", "i": "{{ index }}"}},
            {"id": "ld", "task": "load", "input": "{{ steps.ex.output }}"},
        ]}},
        {"id": "sum", "task": "noop", "input": "{{ steps.m.output }}"},
    ])


def test_map_respects_max_concurrency_and_keeps_item_order():
    sim = Sim(map_wf(limit=2))
    sim.start({"parts": ["a", "b", "c", "d", "e"]})
    peak = 0
    while sim.inflight() and not any(t.key == "sum" for t in sim.inflight()):
        iterations = {t.key.split("/")[0] for t in sim.inflight()}
        peak = max(peak, len(iterations))
        t = sim.inflight()[-1]  # finish out of order on purpose
        sim.apply(TaskSucceeded(t.task_id, sim.now, f"{t.step_id}:{t.input}"))
    assert peak == 2
    assert sim.task("sum").input == [f"ld:ex:{{'part': '{p}', 'i': {i}}}" for i, p in enumerate("abcde")]


def test_map_item_input_and_instance_keys():
    sim = Sim(map_wf())
    sim.start({"parts": ["x", "y"]})
    assert sim.task("m[1]/ex").input == {"part": "y", "i": 1}
    assert sim.task("m[1]/ex").task_id == "r1:m[1]/ex:1"


def test_map_over_empty_list_succeeds_with_empty_output():
    sim = Sim(map_wf())
    sim.start({"parts": []})
    assert sim.task("sum").input == []


def test_map_items_not_a_list_fails():
    sim = Sim(map_wf())
    sim.start({"parts": "abc"})
    assert sim.state.status == "failed"
    assert "must be a list" in sim.state.steps["m"].error["message"]


def test_map_iteration_failure_fails_the_map():
    sim = Sim(map_wf())
    sim.start({"parts": ["a", "b"]})
    sim.fail("m[0]/ex", retryable=False)
    assert sim.state.steps["m"].status == "failed"
    assert sim.state.steps["m[1]/ex"].status == "cancelled"


# --------------------------------------------------------------- compensation

SAGA = [
    {"id": "reserve", "task": "reserve", "compensate": {"task": "release", "input": "{{ steps.reserve.output }}"}},
    {"id": "charge", "task": "charge", "compensate": {"task": "refund"}},
    {"id": "note", "task": "noop"},
    {"id": "ship", "task": "ship"},
]


def test_failure_compensates_completed_steps_in_reverse_order():
    sim = Sim(workflow(SAGA))
    sim.start()
    sim.succeed("reserve", "res-1")
    sim.succeed("charge")
    sim.succeed("note")
    sim.fail("ship", retryable=False)
    assert sim.state.status == "compensating"
    assert sim.task("charge", compensation=True).handler == "refund"
    sim.succeed("charge", compensation=True)
    assert sim.task("reserve", compensation=True).input == "res-1"
    sim.succeed("reserve", compensation=True)
    assert sim.executed(compensation=True) == ["charge", "reserve"]
    assert sim.state.status == "compensated"
    assert sim.finished().error["step"] == "ship"


def test_compensation_order_follows_completion_not_definition():
    steps = [
        {"id": "a", "task": "t", "needs": [], "compensate": {"task": "ua"}},
        {"id": "b", "task": "t", "needs": [], "compensate": {"task": "ub"}},
        {"id": "c", "task": "t", "needs": ["a", "b"]},
    ]
    sim = Sim(workflow(steps))
    sim.start()
    sim.succeed("b")
    sim.succeed("a")
    sim.fail("c", retryable=False)
    sim.succeed("a", compensation=True)
    sim.succeed("b", compensation=True)
    assert sim.executed(compensation=True) == ["a", "b"]


def test_failed_compensation_is_retried_then_run_fails_loudly_and_continues():
    steps = [
        {"id": "a", "task": "t", "compensate": {"task": "ua"}},
        {"id": "b", "task": "t", "compensate": {"task": "ub", "retry": {"max_attempts": 2, "initial_delay": 1, "jitter": 0}}},
        {"id": "c", "task": "t"},
    ]
    sim = Sim(workflow(steps))
    sim.start()
    sim.succeed("a")
    sim.succeed("b")
    sim.fail("c", retryable=False)
    sim.fail("b", compensation=True)
    assert sim.records("compensation.retrying")
    sim.advance(1)
    sim.fail("b", compensation=True)
    assert sim.state.steps["b"].compensation == "failed"
    sim.succeed("a", compensation=True)  # the rest is still compensated
    assert sim.state.status == "failed"
    assert sim.records("compensation.failed")[0].key == "b"


def test_failure_with_nothing_to_compensate_ends_failed():
    sim = Sim(workflow(chain("a", "b")))
    sim.start()
    sim.succeed("a")
    sim.fail("b", retryable=False)
    assert sim.state.status == "failed"
    assert sim.finished().status == "failed"


# ------------------------------------------------------- cancel, retry, child

def test_cancel_halts_and_compensates():
    sim = Sim(workflow(SAGA))
    sim.start()
    sim.succeed("reserve")
    charge = sim.task("charge")
    out = sim.apply(CancelRequested(sim.now, "operator said so"))
    assert CancelTask(charge.task_id) in out
    sim.succeed("reserve", compensation=True)
    assert sim.state.status == "cancelled"
    assert sim.state.error["type"] == "Cancelled"


def test_cancel_of_a_finished_run_changes_nothing():
    sim = Sim(workflow(chain("a")))
    sim.start()
    sim.succeed("a")
    before = sim.state.view()
    sim.apply(CancelRequested(sim.now))
    assert sim.state.view() == before


def test_retry_resumes_from_the_failed_step_keeping_outputs():
    steps = [{"id": "a", "task": "t"}, {"id": "b", "task": "t", "input": "{{ steps.a.output }}"}, {"id": "c", "task": "t"}]
    sim = Sim(workflow(steps))
    sim.start()
    sim.succeed("a", "A")
    sim.fail("b", retryable=False)
    assert sim.state.status == "failed"
    sim.apply(RetryRequested(sim.now))
    assert sim.state.status == "running" and sim.state.attempt == 2
    assert [t.key for t in sim.inflight()] == ["b"]
    assert sim.task("b").input == "A"
    assert sim.task("b").task_id == "r1:b:2"  # attempts never repeat, so keys never collide
    sim.succeed("b")
    sim.succeed("c")
    assert sim.executed().count("a") == 1
    assert sim.state.status == "succeeded"


def test_retry_reruns_compensated_steps():
    sim = Sim(workflow(SAGA))
    sim.start()
    sim.succeed("reserve")
    sim.succeed("charge")
    sim.succeed("note")
    sim.fail("ship", retryable=False)
    sim.succeed("charge", compensation=True)
    sim.succeed("reserve", compensation=True)
    sim.apply(RetryRequested(sim.now))
    assert sim.task("reserve").task_id == "r1:reserve:2"
    sim.run_all()
    assert sim.state.status == "succeeded"
    assert sim.executed().count("note") == 1


def test_retry_of_a_running_run_is_ignored():
    sim = Sim(workflow(chain("a")))
    sim.start()
    before = sim.state.view()
    sim.apply(RetryRequested(sim.now))
    assert sim.state.view() == before
    assert sim.records("retry.ignored")


def test_child_workflow_start_and_result():
    steps = [{"id": "child", "workflow": {"name": "other", "input": {"x": "{{ input.x }}"}, "workflow_id": "c-{{ input.x }}"}}]
    sim = Sim(workflow(steps))
    out = sim.start({"x": 5})
    assert StartChild("child", "other", {"x": 5}, "c-5") in out
    sim.apply(ChildFinished("child", sim.now, "succeeded", {"y": 1}))
    assert sim.state.status == "succeeded" and sim.finished().output == {"y": 1}


def test_child_workflow_failure_fails_step_and_cancel_cancels_child():
    steps = [{"id": "child", "workflow": {"name": "other"}}]
    sim = Sim(workflow(steps))
    sim.start()
    sim.apply(ChildFinished("child", sim.now, "failed", None, ErrorInfo("Boom", "child broke")))
    assert sim.state.status == "failed"
    sim2 = Sim(workflow(steps))
    sim2.start()
    assert CancelChild("child") in sim2.apply(CancelRequested(sim2.now))


# ---------------------------------------------------------------------- purity

ALLOWED_IMPORTS = {"__future__", "collections", "dataclasses", "datetime", "typing", "server.engine",
                   "server.definitions", "server.errors", "re", "jinja2", "pydantic"}


def test_engine_imports_nothing_that_does_io_or_reads_clocks():
    root = pathlib.Path(__file__).resolve().parent.parent / "server" / "engine"
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert any(name == a or name.startswith(a + ".") for a in ALLOWED_IMPORTS), f"{path.name} imports {name}"
    src = "\n".join(p.read_text() for p in root.glob("*.py"))
    for banned in ("datetime.now", "time.time", "random.", "utcnow", "open("):
        assert banned not in src, banned


def test_commands_are_comparable_values():
    assert ExecuteTask("t", "k", "k", "h", {"a": 1}, 1) == ExecuteTask("t", "k", "k", "h", {"a": 1}, 1)
    assert StartTimer("x", 1.0) != StartTimer("x", 2.0)


def test_inflight_commands_rebuild_the_dispatched_tasks():
    from server.engine.decide import inflight_commands

    sim = Sim(workflow(PARALLEL))
    sim.start()
    assert sorted(inflight_commands(sim.state), key=lambda c: c.key) == sorted(sim.inflight(), key=lambda c: c.key)
    sim.succeed("l1", "x")
    assert sorted(c.task_id for c in inflight_commands(sim.state)) == sorted(c.task_id for c in sim.inflight())


def test_run_output_skips_skipped_steps_or_follows_the_output_template():
    steps = [{"id": "a", "task": "t"}, {"id": "b", "task": "t", "when": "false"}]
    sim = Sim(workflow(steps))
    sim.start()
    sim.succeed("a", "A")
    assert sim.finished().output == "A"
    sim = Sim(workflow(steps, output={"total": "{{ steps.a.output * 2 }}", "b": "{{ steps.b.status }}"}))
    sim.start()
    sim.succeed("a", 21)
    assert sim.finished().output == {"total": 42, "b": "skipped"}


def test_output_template_error_fails_the_run():
    sim = Sim(workflow(chain("a"), output="{{ steps.a.output.missing }}"))
    sim.start()
    sim.succeed("a", {})
    assert sim.state.status == "failed" and sim.state.error["message"].startswith("output:")
