"""`baton worker`: run the handlers of remote task queues in a process of their own.

    fetch a task (one per free slot) ──> skip it if cancelled, a duplicate, or past its deadline
      ──> report `started` (Baton arms the heartbeat deadline) ──> ack the task
      ──> run the handler, with a heartbeat every heartbeat_s / 3
      ──> report `succeeded` or `failed` (sent again until NATS takes it)

The task is acked only once `started` is in the results stream: a worker that dies
before that leaves it unacked, and the queue offers it again after TASK_ACK_WAIT_S.
After the ack Baton owns the attempt: its heartbeat deadline notices a dead worker
and its retry policy sends a new attempt, maybe to another worker.

SIGTERM stops fetching and lets running handlers finish for a grace period; the rest
are cancelled without a report (Baton retries them when their heartbeats stop).
Handlers are the same `@handler` functions as in the server, called the same way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections import OrderedDict
from typing import Any

import orjson

import handlers
from handlers import Context, Registry
from server.app import configure_logging, import_handler_modules
from server.bus.connection import Bus, mapped, settle
from server.bus.tasks import (
    FAILED, HEARTBEAT, RESULTS_STREAM, STARTED, SUCCEEDED, TASKS_STREAM, Result, Task, cancel_subject, decode_task,
    encode_result, result_subject, task_subject, worker_consumer,
)
from server.errors import BadRequest, BusError
from server.runtime.executor import call_handler
from server.settings import Settings
from server.telemetry import logs
from server.telemetry.ids import parse_traceparent, run_trace_id
from server.telemetry.propagation import handler_span

log = logging.getLogger("baton.worker")

FETCH_WAIT_S = 1.0  # a free slot long-polls its queue this long, then looks again
RETRY_S = 1.0  # first delay before sending a result again (doubling, up to RETRY_MAX_S)
RETRY_MAX_S = 30.0
HEARTBEATS_PER_INTERVAL = 3  # two heartbeats may be lost before Baton takes the worker for dead
REMEMBER_CANCELLED = 10_000  # cancelled task ids kept, so a copy still queued is skipped


class Worker:
    def __init__(self, bus: Bus, queues: list[str], registry: Registry, *, concurrency: int,
                 name: str | None = None) -> None:
        self.bus = bus
        self.queues = list(dict.fromkeys(queues))
        self.registry = registry
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self._slots = asyncio.Semaphore(concurrency)
        self._running: dict[str, asyncio.Task] = {}
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        self._fetchers: list[asyncio.Task] = []

    async def start(self) -> None:
        # the same streams Baton creates: whichever starts first sets them up
        await self.bus.ensure_stream(TASKS_STREAM)
        await self.bus.ensure_stream(RESULTS_STREAM)
        for queue in self.queues:
            config = worker_consumer(queue)
            with mapped(f"cannot subscribe to queue {queue!r}"):
                tasks = await self.bus.js.pull_subscribe(
                    task_subject(queue), durable=config.durable_name, stream=TASKS_STREAM.name, config=config)
                self.bus.track(tasks)
                self.bus.track(await self.bus.nc.subscribe(cancel_subject(queue), cb=self._on_cancel))
            self._fetchers.append(asyncio.create_task(self._fetch(queue, tasks), name=f"fetch {queue}"))
        log.info("worker %s serving queues %s with handlers %s", self.name, ", ".join(self.queues),
                 ", ".join(self.registry.names()) or "(none)")

    async def stop(self, grace_s: float) -> int:
        """Stop fetching; let running tasks finish for up to grace_s, then cancel the rest.
        Returns how many were cancelled."""
        for fetcher in self._fetchers:
            fetcher.cancel()
        await asyncio.gather(*self._fetchers, return_exceptions=True)
        running = list(self._running.values())
        if not running:
            return 0
        log.info("waiting up to %.0fs for %d running tasks", grace_s, len(running))
        _, late = await asyncio.wait(running, timeout=grace_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        if late:
            log.warning("%d tasks did not finish within %.0fs; Baton retries them when their heartbeats stop", len(late), grace_s)
        return len(late)

    # --- fetching ---

    async def _fetch(self, queue: str, sub: Any) -> None:
        while True:
            await self._slots.acquire()
            taken = False
            try:
                msg = await self._next(sub)
                if msg is not None:
                    taken = await self._take(queue, msg)
            finally:
                if not taken:
                    self._slots.release()

    async def _next(self, sub: Any) -> Any:
        try:
            msgs = await sub.fetch(1, timeout=FETCH_WAIT_S)
        except asyncio.TimeoutError:  # the queue is empty (nats' TimeoutError is one too)
            return None
        except Exception as exc:  # disconnected: nats-py reconnects by itself
            log.warning("fetching tasks failed (again in %.0fs): %s", RETRY_S, exc or type(exc).__name__)
            await asyncio.sleep(RETRY_S)
            return None
        return msgs[0] if msgs else None

    async def _take(self, queue: str, msg: Any) -> bool:
        """Start running a fetched task; False if it is not to be run (the slot stays free)."""
        try:
            task = decode_task(msg.data)
        except BadRequest as exc:
            log.error("dropping a malformed task on %s: %s", msg.subject, exc.message)
            await settle(msg.term)
            return False
        if task.task_id in self._running or task.task_id in self._cancelled or _past(task.deadline):
            log.info("skipping task %s: already running here, cancelled, or past its deadline", task.task_id)
            await settle(msg.ack)
            return False
        runner = asyncio.create_task(self._run(queue, task, msg), name=task.task_id)
        self._running[task.task_id] = runner
        runner.add_done_callback(lambda _t, tid=task.task_id: self._done(tid))
        return True

    def _done(self, task_id: str) -> None:
        self._running.pop(task_id, None)
        self._slots.release()

    async def _on_cancel(self, msg: Any) -> None:
        try:
            task_id = orjson.loads(msg.data)["task_id"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        self._cancelled[task_id] = None
        while len(self._cancelled) > REMEMBER_CANCELLED:
            self._cancelled.popitem(last=False)
        runner = self._running.get(task_id)
        if runner is not None:
            log.info("task %s cancelled by Baton", task_id)
            runner.cancel()

    # --- running ---

    async def _run(self, queue: str, task: Task, msg: Any) -> None:
        if not await self._send(queue, Result(task.task_id, task.run_id, STARTED, self.name), retry=False):
            await settle(msg.nak, RETRY_S)  # Baton has not heard of it: offer it again
            return
        await settle(msg.ack)
        beating = asyncio.create_task(self._heartbeats(queue, task))
        try:
            output, error = await self._call(task, (getattr(msg, "headers", None) or {}).get("traceparent"))
        except TimeoutError:
            log.info("task %s passed its deadline; Baton has failed the attempt", task.task_id)
            return
        finally:
            beating.cancel()
            await asyncio.gather(beating, return_exceptions=True)
        if error is None:
            result = Result(task.task_id, task.run_id, SUCCEEDED, self.name, output=output)
        else:
            result = Result(task.task_id, task.run_id, FAILED, self.name, error=error)
        await self._send(queue, result, retry=True)

    async def _call(self, task: Task, parent: str | None = None) -> tuple[Any, Any]:
        # `parent`: the task message's `traceparent`, the attempt's span in the run's trace;
        # the handler's own spans and its outgoing calls continue it
        received = parse_traceparent(parent)
        ctx = Context(
            workflow=task.workflow, version=task.version, workflow_id=task.workflow_id, run_id=task.run_id,
            step_id=task.key, task_id=task.task_id, attempt=task.attempt, idempotency_key=task.task_id,
            compensation=task.compensation, deadline=task.deadline,
            traceparent=parent if received is not None else None,
        )
        # log lines carry the trace the header names, else the one derived from the run id
        trace_id = received[0] if received is not None else run_trace_id(task.run_id)
        with handler_span(ctx.traceparent), logs.attempt_context(ctx, trace_id):
            if task.deadline is None:
                return await call_handler(self.registry, task.handler, ctx, task.input)
            async with asyncio.timeout_at(_loop_time(task.deadline)):
                return await call_handler(self.registry, task.handler, ctx, task.input)

    async def _heartbeats(self, queue: str, task: Task) -> None:
        every_s = task.heartbeat_s / HEARTBEATS_PER_INTERVAL
        beat = Result(task.task_id, task.run_id, HEARTBEAT, self.name)
        while True:
            await asyncio.sleep(every_s)
            await self._send(queue, beat, retry=False)

    async def _send(self, queue: str, result: Result, *, retry: bool) -> bool:
        """Publish into the results stream; with `retry`, until NATS takes it."""
        body = encode_result(result)
        delay = RETRY_S
        while True:
            try:
                await self.bus.publish(result_subject(queue), body, msg_id=result.msg_id)
                return True
            except BusError as exc:
                if not retry:
                    log.warning("cannot report %s of task %s: %s", result.type, result.task_id, exc.message)
                    return False
                log.warning("cannot report %s of task %s (again in %.0fs): %s", result.type, result.task_id, delay, exc.message)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)


def _past(deadline: float | None) -> bool:
    return deadline is not None and deadline <= time.time()


def _loop_time(deadline: float) -> float:
    """A unix-time deadline on the event loop's monotonic clock."""
    return asyncio.get_running_loop().time() + (deadline - time.time())



# --- the process ------------------------------------------------------------------------


async def serve_worker(settings: Settings, queues: list[str], modules: list[str], *, concurrency: int,
                       grace_s: float) -> None:
    import_handler_modules(modules)
    bus = Bus(settings.nats_servers, settings.nats, name=f"baton-worker {settings.worker.name or os.getpid()}")
    await bus.connect()
    try:
        worker = Worker(bus, queues, handlers.REGISTRY, concurrency=concurrency, name=settings.worker.name)
        await worker.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down: no new tasks; running ones get %.0fs to finish", grace_s)
        await worker.stop(grace_s)
    finally:
        await bus.close()
        await handlers.REGISTRY.aclose()


def run_worker(settings: Settings, queues: list[str], modules: list[str], *, concurrency: int, grace_s: float) -> None:
    configure_logging(settings)
    asyncio.run(serve_worker(settings, queues, modules, concurrency=concurrency, grace_s=grace_s))
