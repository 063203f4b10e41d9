"""Runs in-process handlers: one asyncio task per attempt, under a global and a
per-workflow concurrency limit. Every outcome goes back to the engine as an event;
a cancelled attempt reports nothing (the engine already moved on from it)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson

from handlers import NonRetryableError, Registry, invoke
from handlers.context import Context, error_type_name
from server.engine.commands import ExecuteTask
from server.engine.events import ErrorInfo, Event, TaskFailed, TaskSucceeded
from server.runtime.clock import Clock
from server.telemetry import logs
from server.telemetry.ids import run_trace_id, task_span_id, traceparent
from server.telemetry.propagation import handler_span

log = logging.getLogger("baton.executor")


class RunInfo:
    """What a handler's Context needs to know about its run."""

    __slots__ = ("run_id", "workflow", "version", "workflow_id", "trace_id", "event")

    def __init__(self, run_id: str, workflow: str, version: str, workflow_id: str | None,
                 trace_id: str | None = None, event: Any = None) -> None:
        self.run_id, self.workflow, self.version, self.workflow_id = run_id, workflow, version, workflow_id
        self.trace_id = trace_id  # the run's trace (server/telemetry/ids.py); None when tracing is off
        self.event = event  # the run's trigger event: its `traceparent` names the trace of log lines

    @property
    def log_trace_id(self) -> str:
        """The trace id a step's log lines carry: the run's spans', or without tracing the
        one they would have (derived when a line is logged, not for every dispatch)."""
        return self.trace_id if self.trace_id is not None else run_trace_id(self.run_id, self.event)


class Executor:
    def __init__(self, registry: Registry, clock: Clock, report: Callable[[str, Event], None], *,
                 max_tasks: int, max_tasks_per_workflow: int) -> None:
        self._registry = registry
        self._clock = clock
        self._report = report
        self._global = asyncio.Semaphore(max_tasks)
        self._per_workflow: dict[str, asyncio.Semaphore] = {}
        self._per_workflow_limit = max_tasks_per_workflow
        self._running: dict[str, asyncio.Task] = {}
        self.running = 0  # attempts holding their slots; the rest of len(self) wait for one (metrics)

    def __len__(self) -> int:
        return len(self._running)

    def submit(self, cmd: ExecuteTask, run: RunInfo) -> None:
        if cmd.task_id in self._running:
            return  # the same attempt is already running here (a recovered duplicate)
        task = asyncio.create_task(self._run(cmd, run), name=cmd.task_id)
        self._running[cmd.task_id] = task
        task.add_done_callback(lambda _t, tid=cmd.task_id: self._running.pop(tid, None))

    def cancel(self, task_id: str) -> None:
        task = self._running.get(task_id)
        if task is not None:
            task.cancel()

    async def drain(self, grace_s: float) -> int:
        """Let running handlers finish for up to grace_s, then cancel the rest.
        Returns how many were cancelled (they run again after the restart)."""
        pending = list(self._running.values())
        if pending:
            _, still = await asyncio.wait(pending, timeout=grace_s)
            for task in still:
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)
            return len(still)
        return 0

    async def _run(self, cmd: ExecuteTask, run: RunInfo) -> None:
        sem = self._per_workflow.get(run.workflow)
        if sem is None:
            sem = self._per_workflow[run.workflow] = asyncio.Semaphore(self._per_workflow_limit)
        async with self._global, sem:
            self.running += 1
            try:
                event = await self._attempt(cmd, run)
            finally:
                self.running -= 1
        self._report(run.run_id, event)

    async def _attempt(self, cmd: ExecuteTask, run: RunInfo) -> Event:
        parent = None if run.trace_id is None else traceparent(run.trace_id, task_span_id(cmd.task_id))
        ctx = Context(
            workflow=run.workflow, version=run.version, workflow_id=run.workflow_id, run_id=run.run_id,
            step_id=cmd.key, task_id=cmd.task_id, attempt=cmd.attempt, idempotency_key=cmd.task_id,
            compensation=cmd.compensation,
            deadline=self._clock.now() + cmd.timeout_s if cmd.timeout_s is not None else None,
            traceparent=parent,
        )
        with handler_span(parent), logs.attempt_context(ctx, run.log_trace_id):
            output, error = await call_handler(self._registry, cmd.handler, ctx, cmd.input)
        if error is not None:
            return TaskFailed(cmd.task_id, self._clock.now(), error, self._clock.jitter())
        return TaskSucceeded(cmd.task_id, self._clock.now(), output)


async def call_handler(registry: Registry, name: str, ctx: Context, input: Any) -> tuple[Any, ErrorInfo | None]:
    """One attempt of handler `name`: (output, None), or (None, the error as the engine
    records it). Shared with `baton worker`, so remote attempts fail in the same shapes."""
    try:
        fn = registry.get(name)
    except KeyError as exc:
        return None, ErrorInfo("UnknownHandler", str(exc.args[0]) if exc.args else name, False)
    try:
        output = await invoke(fn, ctx, input, name=name)
    except asyncio.CancelledError:
        raise
    except NonRetryableError as exc:
        return None, ErrorInfo(error_type_name(exc), str(exc), False, exc.details)
    except Exception as exc:  # a handler's error is data for the engine, whatever its type
        return None, ErrorInfo(type(exc).__name__, str(exc) or repr(exc), True)
    try:
        orjson.dumps(output)
    except TypeError as exc:
        return None, ErrorInfo("OutputNotJSON", f"handler {name!r} returned a value that is not JSON: {exc}", False)
    return output, None
