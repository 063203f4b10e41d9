"""Property tests of the engine's invariants over random workflows and random outcomes.

Invariants:
1. A succeeded step never runs again (unless its compensation ran and the run was retried).
2. Compensation runs only for succeeded steps that have a compensator, in reverse
   order of their completion.
3. When every handler eventually answers, every run reaches a terminal state.
4. Replaying the history's events from the start rebuilds the same state.
"""

from __future__ import annotations

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.engine.commands import ExecuteTask
from server.engine.decide import decide, new_run
from server.engine.events import (
    CancelRequested, ErrorInfo, RetryRequested, SignalReceived, TaskFailed, TaskSucceeded, event_from_dict,
    event_to_dict,
)
from tests.enginesim import Sim, workflow

RETRY = {"initial_delay": 1, "multiplier": 2, "max_delay": 10, "jitter": 0.5}


@st.composite
def step_lists(draw, prefix: str, depth: int, counter: list[int]):
    n = draw(st.integers(1, 4))
    steps = []
    for i in range(n):
        counter[0] += 1
        sid = f"{prefix}{counter[0]}"
        kinds = ["task", "task", "task", "signal", "sleep"] + (["parallel", "map"] if depth < 2 else [])
        kind = draw(st.sampled_from(kinds))
        step: dict = {"id": sid}
        if kind == "task":
            step.update(task="work", retry={"max_attempts": draw(st.integers(1, 3)), **RETRY})
            if draw(st.booleans()):
                step["compensate"] = {"task": "undo", "retry": {"max_attempts": draw(st.integers(1, 2)), **RETRY}}
        elif kind == "signal":
            step["wait_for_signal"] = {"signal": draw(st.sampled_from(["go", "ok"])),
                                       **({"timeout": 50} if draw(st.booleans()) else {})}
        elif kind == "sleep":
            step["sleep"] = draw(st.integers(0, 30))
        elif kind == "parallel":
            step["parallel"] = {f"b{j}": draw(step_lists(f"{sid}b{j}_", depth + 1, counter)) for j in range(draw(st.integers(1, 2)))}
        else:
            step["map"] = {"items": "input.items", "max_concurrency": draw(st.integers(1, 3)),
                           "steps": draw(step_lists(f"{sid}m_", depth + 1, counter))}
        if i > 0 and draw(st.booleans()):
            earlier = [s["id"] for s in steps]
            step["needs"] = draw(st.lists(st.sampled_from(earlier), max_size=2, unique=True))
        if draw(st.integers(0, 4)) == 0:
            step["when"] = f"input.flags[{draw(st.integers(0, 2))}]"
        steps.append(step)
    return steps


@st.composite
def scenarios(draw):
    steps = draw(step_lists("s", 0, [0]))
    run_input = {"items": list(range(draw(st.integers(0, 3)))), "flags": draw(st.lists(st.booleans(), min_size=3, max_size=3))}
    timeout = draw(st.sampled_from([None, None, 500]))
    extra = {"timeout": timeout} if timeout else {}
    return workflow(steps, **extra), run_input


def drive(sim: Sim, data, max_events: int = 400) -> dict:
    """Play the run with random outcomes; check invariants 1 and 2 as it goes."""
    nodes = sim.state.graph.nodes
    succeeded: set[str] = set()
    completion: list[str] = []  # compensable steps in order of completion
    comp_started: list[str] = []
    retries_left = data.draw(st.integers(0, 2))
    seen_commands = 0
    for _ in range(max_events):
        state = sim.state
        # invariant 1: no new ExecuteTask for a step that succeeded
        for cmd in sim.commands[seen_commands:]:
            if isinstance(cmd, ExecuteTask):
                if cmd.compensation:
                    if cmd.key not in comp_started:
                        comp_started.append(cmd.key)
                else:
                    assert cmd.key not in succeeded, f"succeeded step {cmd.key} ran again"
        seen_commands = len(sim.commands)
        for key, s in state.steps.items():
            if s.status == "succeeded" and key not in succeeded and s.compensation is None:
                succeeded.add(key)
                if nodes[s.step_id].step.compensate is not None:
                    completion.append(key)
            if s.compensation is not None and key in succeeded:  # undone (or partly): may run again
                succeeded.discard(key)
        if state.terminal:
            if state.status != "succeeded":
                # invariant 2: reverse completion order, only compensable succeeded steps
                assert comp_started == list(reversed(completion)), (comp_started, completion)
            if state.status == "succeeded" or retries_left == 0:
                return {"status": state.status}
            retries_left -= 1
            completion = [k for k in completion if state.steps[k].compensation is None]
            comp_started = []
            sim.apply(RetryRequested(sim.now))
            continue
        inflight = [c for c in sim.commands if isinstance(c, ExecuteTask) and c.task_id in state.tasks]
        choice = data.draw(st.integers(0, 9))
        if inflight and choice < 7:
            task = inflight[data.draw(st.integers(0, len(inflight) - 1))]
            outcome = data.draw(st.sampled_from(["ok", "ok", "ok", "retryable", "fatal"]))
            if outcome == "ok":
                sim.apply(TaskSucceeded(task.task_id, sim.now, {"by": task.key}))
            else:
                sim.apply(TaskFailed(task.task_id, sim.now, ErrorInfo("Boom", "x", outcome == "retryable"),
                                     data.draw(st.floats(0, 0.999))))
        elif state.signals and choice < 9:
            name = data.draw(st.sampled_from(sorted(state.signals)))
            sim.apply(SignalReceived(name, sim.now, {"signal": name}))
        elif state.timers:
            sim.now = min(state.timers.values())
            sim.fire_due()
        elif choice == 9:
            sim.apply(CancelRequested(sim.now))
        elif inflight:
            sim.apply(TaskSucceeded(inflight[0].task_id, sim.now, None))
        elif state.signals:
            sim.apply(SignalReceived(sorted(state.signals)[0], sim.now, None))
        else:
            raise AssertionError(f"run {state.status} is stuck: no task, timer or signal can move it")
        sim.now += data.draw(st.integers(0, 3))
    raise AssertionError("run did not reach a terminal state")


@settings(max_examples=int(__import__("os").environ.get("BATON_PROPERTY_EXAMPLES", "300")), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.data())
def test_invariants_hold_for_random_workflows_and_outcomes(scenario, data):
    graph, run_input = scenario
    sim = Sim(graph)
    sim.start(run_input)
    result = drive(sim, data)
    assert result["status"] in ("succeeded", "failed", "compensated", "cancelled")  # invariant 3

    # invariant 4: replaying the history (events as the store keeps them: JSON) rebuilds the same state
    replayed = new_run(sim.state.run_id, graph)
    for event in sim.events:
        stored = orjson.loads(orjson.dumps(event_to_dict(event)))
        decide(replayed, event_from_dict(event.type, stored))
    assert replayed.view() == sim.state.view()
    assert not sim.state.tasks and not sim.state.timers and not sim.state.signals
