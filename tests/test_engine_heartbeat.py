"""Remote tasks in the pure engine: the heartbeat deadline, HeartbeatTimeout retries,
and late results of attempts that are no longer current."""

from __future__ import annotations

import orjson

from server.engine.commands import CancelTask, CancelTimer, ExecuteTask, StartTimer
from server.engine.decide import (
    LOST_ATTEMPTS, decide, inflight_commands, new_run, only_moves_a_heartbeat, started_remote_tasks,
)
from server.engine.events import (
    ErrorInfo, TaskFailed, TaskHeartbeat, TaskStarted, TaskSucceeded, TimerFired, event_from_dict, event_to_dict,
)
from server.engine.graph import on_queue
from tests.enginesim import Sim, workflow

RETRY = {"max_attempts": 3, "initial_delay": 1, "jitter": 0}


def remote(**extra) -> list[dict]:
    return [{"id": "a", "task": "gpu.render", "queue": "gpu", "heartbeat": 10, "retry": RETRY, **extra}]


def started_sim(**extra) -> tuple[Sim, ExecuteTask]:
    sim = Sim(workflow(remote(**extra)))
    sim.start()
    task = sim.task("a")
    sim.apply(TaskStarted(task.task_id, sim.now, "w1"))
    return sim, task


def test_a_queue_step_is_dispatched_with_its_queue_and_heartbeat_and_no_deadline_until_started():
    sim = Sim(workflow(remote()))
    sim.start()
    task = sim.task("a")
    assert (task.queue, task.heartbeat_s, task.task_id) == ("gpu", 10.0, "r1:a:1")
    assert sim.state.timers == {}  # waiting in the queue for a free worker is not a dead worker
    assert sim.apply(TaskHeartbeat(task.task_id, sim.now)) == []  # no worker said it started it


def test_started_arms_the_deadline_and_each_heartbeat_moves_it():
    sim, task = started_sim()
    assert sim.state.timers == {"heartbeat:a:1": 1010.0}
    sim.now += 4
    assert sim.apply(TaskHeartbeat(task.task_id, sim.now)) == [StartTimer("heartbeat:a:1", 1014.0)]
    sim.advance(9)  # 1013: before the moved deadline
    assert task.task_id in sim.state.tasks


def test_a_silent_worker_fails_the_attempt_with_heartbeat_timeout_and_it_is_retried():
    sim, task = started_sim()
    out = sim.advance(10)
    assert CancelTask(task.task_id) in out
    retrying = sim.records("step.retrying")[0].data
    assert retrying["error"]["type"] == "HeartbeatTimeout" and retrying["error"]["retryable"] is True
    assert sim.state.steps["a"].status == "retrying"
    sim.advance(1)
    again = sim.task("a")
    assert (again.task_id, again.attempt) == ("r1:a:2", 2)
    assert "heartbeat:a:2" not in sim.state.timers  # armed again only when a worker starts it


def test_heartbeat_timeout_without_attempts_left_fails_the_run():
    sim, task = started_sim(retry={"max_attempts": 1})
    sim.advance(10)
    assert sim.finished().status == "failed"
    assert sim.state.error["type"] == "HeartbeatTimeout" and sim.state.error["step"] == "a"


def test_late_and_duplicate_results_of_an_attempt_that_is_no_longer_current_are_ignored():
    sim, first = started_sim()
    sim.advance(10)  # attempt 1 timed out on heartbeats
    sim.advance(1)  # attempt 2 is dispatched
    second = sim.task("a")
    before = sim.state.view()
    for late in (TaskSucceeded(first.task_id, sim.now, "stale"),
                 TaskFailed(first.task_id, sim.now, ErrorInfo("Boom", "stale")),
                 TaskStarted(first.task_id, sim.now, "w1")):
        out = sim.apply(late)
        assert [c.type for c in out] == ["task.ignored"]
    assert sim.apply(TaskHeartbeat(first.task_id, sim.now)) == []
    assert sim.state.view() == before
    sim.apply(TaskSucceeded(second.task_id, sim.now, "fresh"))
    assert sim.finished().output == "fresh"
    out = sim.apply(TaskSucceeded(second.task_id, sim.now, "again"))  # a duplicate delivery
    assert [c.type for c in out] == ["task.ignored"] and sim.state.output == "fresh"


def test_an_outcome_cancels_the_heartbeat_and_timeout_deadlines():
    sim, task = started_sim(timeout=60)
    assert set(sim.state.timers) == {"heartbeat:a:1", "timeout:a:1"}
    out = sim.apply(TaskSucceeded(task.task_id, sim.now, 1))
    assert {c.timer_id for c in out if isinstance(c, CancelTimer)} == {"heartbeat:a:1", "timeout:a:1"}
    assert sim.state.timers == {}


def test_a_step_timeout_of_a_started_attempt_drops_its_heartbeat_deadline():
    sim, task = started_sim(timeout=5)
    out = sim.advance(5)
    assert CancelTimer("heartbeat:a:1") in out and CancelTask(task.task_id) in out
    assert sim.records("step.retrying")[0].data["error"]["type"] == "Timeout"
    assert "heartbeat:a:1" not in sim.state.timers


def test_a_timer_that_fired_before_a_heartbeat_moved_it_stays_armed():
    sim, task = started_sim()
    sim.now = 1010.0
    sim.apply(TaskHeartbeat(task.task_id, 1009.5))  # decided after the timer fired, before its event
    fired = TimerFired("heartbeat:a:1", 1010.0)
    out = sim.apply(fired)
    assert out == [StartTimer("heartbeat:a:1", 1019.5)]  # the runtime keeps the moved timer row
    assert task.task_id in sim.state.tasks
    assert only_moves_a_heartbeat(fired, out)
    assert not only_moves_a_heartbeat(TaskStarted(task.task_id, 1.0), [StartTimer("heartbeat:a:1", 2.0)])


def test_a_compensation_on_a_queue_has_its_own_heartbeat_deadline_and_retry_policy():
    steps = remote(compensate={"task": "gpu.cleanup", "retry": {"max_attempts": 2, "initial_delay": 1, "jitter": 0}})
    steps.append({"id": "b", "task": "local"})
    sim = Sim(workflow(steps))
    sim.start()
    sim.succeed("a", "done")
    sim.fail("b", retryable=False)
    comp = sim.task("a", compensation=True)
    assert (comp.handler, comp.queue, comp.heartbeat_s, comp.task_id) == ("gpu.cleanup", "gpu", 10.0, "r1:a:compensate:1")
    sim.apply(TaskStarted(comp.task_id, sim.now, "w1"))
    assert "cheartbeat:a:1" in sim.state.timers
    sim.advance(10)
    assert sim.records("compensation.retrying")[0].data["error"]["type"] == "HeartbeatTimeout"
    sim.advance(1)
    again = sim.task("a", compensation=True)
    assert again.task_id == "r1:a:compensate:2"
    sim.apply(TaskSucceeded(again.task_id, sim.now))
    assert sim.finished().status == "compensated"


def test_after_a_restart_only_attempts_no_worker_started_are_sent_again():
    sim = Sim(workflow([*remote(), {"id": "b", "task": "gpu.render", "queue": "gpu", "needs": []}]))
    sim.start()
    a, b = sim.task("a"), sim.task("b")
    assert inflight_commands(sim.state) == [a, b]  # rebuilt with queue and heartbeat
    sim.apply(TaskStarted(a.task_id, sim.now, "w1"))
    assert inflight_commands(sim.state) == [b]  # a's worker has it; its heartbeats tell if it died
    assert started_remote_tasks(sim.state) == [a.task_id]


def test_replaying_the_history_without_heartbeats_reaches_the_same_state():
    sim, task = started_sim(timeout=100)
    for _ in range(5):
        sim.now += 3
        sim.apply(TaskHeartbeat(task.task_id, sim.now))
    sim.advance(10)  # the worker died
    sim.advance(1)
    second = sim.task("a")
    sim.apply(TaskStarted(second.task_id, sim.now, "w2"))
    sim.apply(TaskHeartbeat(second.task_id, sim.now + 1))
    sim.apply(TaskSucceeded(second.task_id, sim.now + 2, "ok"))
    assert sim.finished().status == "succeeded"

    replayed = new_run(sim.state.run_id, sim.state.graph)
    for event in sim.events:
        if isinstance(event, TaskHeartbeat):
            continue  # as the store keeps it: heartbeats are not history
        decide(replayed, event_from_dict(event.type, orjson.loads(orjson.dumps(event_to_dict(event)))))
    assert replayed.view() == sim.state.view()


# -- replicas: in-process steps on the shared queue (engine.graph.on_queue) -----------------


def lost_with(sim: Sim, key: str, compensation: bool = False) -> ExecuteTask:
    """The attempt is started by replica r3, which then dies: its heartbeat deadline passes."""
    task = sim.task(key, compensation)
    sim.apply(TaskStarted(task.task_id, sim.now, "r3"))
    sim.advance(2)
    return task


def test_a_step_lost_with_its_replica_is_made_again_at_once_beyond_its_retry_policy_a_few_times():
    sim = Sim(on_queue(workflow([{"id": "a", "task": "local"}]), "baton", 2.0))  # no retry policy: 1 attempt
    sim.start()
    for attempt in range(1, LOST_ATTEMPTS + 2):
        assert lost_with(sim, "a").attempt == attempt
        if attempt <= LOST_ATTEMPTS:
            assert sim.records("step.retrying")[-1].data["lost"] is True
            sim.fire_due()  # made again now, not after a backoff
    # a handler that takes its replica down every time does not go round the cluster for ever
    assert sim.finished().status == "failed" and "HeartbeatTimeout" in str(sim.finished().error)


def test_a_compensation_lost_with_its_replica_is_made_again_whatever_its_retry_policy():
    sim = Sim(on_queue(workflow([{"id": "a", "task": "local", "compensate": {"task": "undo"}},
                                 {"id": "b", "task": "local"}]), "baton", 2.0))
    sim.start()
    sim.succeed("a", "done")
    sim.fail("b", retryable=False)
    first = lost_with(sim, "a", compensation=True)
    assert sim.records("compensation.retrying")[-1].data["lost"] is True
    sim.fire_due()
    again = sim.task("a", compensation=True)
    assert (first.task_id, again.task_id) == ("r1:a:compensate:1", "r1:a:compensate:2")
    sim.apply(TaskSucceeded(again.task_id, sim.now))
    assert sim.finished().status == "compensated"
