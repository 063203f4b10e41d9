"""A tiny driver for the pure engine: applies events, keeps the commands, fakes time.

Engine tests use it to play a run forward without any I/O: `sim.complete(...)`
feeds task outcomes, `sim.fire_due()` fires the timers that are due at `sim.now`.
"""

from __future__ import annotations

from typing import Any

from server.definitions.models import Workflow
from server.engine.commands import ExecuteTask, Record, RunFinished, StartTimer
from server.engine.decide import decide, new_run
from server.engine.events import ErrorInfo, Event, Start, TaskFailed, TaskSucceeded, TimerFired
from server.engine.graph import compile_workflow


def workflow(steps: list[dict], **extra: Any):
    return compile_workflow(Workflow.model_validate({"name": "wf", "steps": steps, **extra}))


class Sim:
    def __init__(self, graph, run_id: str = "r1", now: float = 1000.0) -> None:
        self.state = new_run(run_id, graph)
        self.now = now
        self.commands: list[Any] = []
        self.events: list[Event] = []

    def apply(self, event: Event) -> list[Any]:
        self.events.append(event)
        _, out = decide(self.state, event)
        self.commands += out
        return out

    def start(self, input: Any = None, **kw: Any) -> list[Any]:
        return self.apply(Start(self.now, input=input, **kw))

    def inflight(self) -> list[ExecuteTask]:
        return [c for c in self.commands if isinstance(c, ExecuteTask) and c.task_id in self.state.tasks]

    def task(self, key: str, compensation: bool = False) -> ExecuteTask:
        found = [c for c in self.inflight() if c.key == key and c.compensation == compensation]
        assert len(found) == 1, f"expected one in-flight task for {key}, found {found}"
        return found[0]

    def succeed(self, key: str, output: Any = None, compensation: bool = False) -> list[Any]:
        return self.apply(TaskSucceeded(self.task(key, compensation).task_id, self.now, output))

    def fail(self, key: str, type_: str = "Boom", retryable: bool = True, compensation: bool = False, jitter: float = 0.5) -> list[Any]:
        err = ErrorInfo(type_, f"{key} broke", retryable)
        return self.apply(TaskFailed(self.task(key, compensation).task_id, self.now, err, jitter))

    def advance(self, seconds: float) -> list[Any]:
        self.now += seconds
        return self.fire_due()

    def fire_due(self) -> list[Any]:
        out: list[Any] = []
        while True:
            due = sorted((at, tid) for tid, at in self.state.timers.items() if at <= self.now)
            if not due:
                return out
            out += self.apply(TimerFired(due[0][1], self.now))

    def run_all(self, outputs: dict[str, Any] | None = None, limit: int = 10_000) -> None:
        """Complete every in-flight task (output from `outputs` or the step id) until idle."""
        for _ in range(limit):
            tasks = self.inflight()
            if not tasks:
                return
            t = tasks[0]
            out = (outputs or {}).get(t.step_id, t.step_id)
            self.apply(TaskSucceeded(t.task_id, self.now, out))
        raise AssertionError("run did not settle")

    def records(self, type_: str) -> list[Record]:
        return [c for c in self.commands if isinstance(c, Record) and c.type == type_]

    def executed(self, compensation: bool = False) -> list[str]:
        return [c.key for c in self.commands if isinstance(c, ExecuteTask) and c.compensation == compensation]

    def finished(self) -> RunFinished | None:
        done = [c for c in self.commands if isinstance(c, RunFinished)]
        return done[-1] if done else None

    def timers_started(self) -> list[StartTimer]:
        return [c for c in self.commands if isinstance(c, StartTimer)]
