"""Baton's side of remote task queues: send tasks to workers, feed their results back.

    ExecuteTask(queue=q) ──submit──> baton.tasks.q (Nats-Msg-Id = task_id) ──> a worker
    CancelTask ──cancel──> delete the task from the stream if no worker took it yet,
                           and say so on baton.cancel.q for the worker that did
    baton.results.> ──consumer `baton-results`──> runtime.report(event) ──committed──> ack

Sending is retried until NATS takes the task: the engine keeps the attempt in flight
and, until a worker starts it, no deadline but the step's `timeout` runs. A restart
re-sends the attempts that no worker started (same Nats-Msg-Id: the stream drops the
copy within its dedupe window); started ones are left to their workers and heartbeats.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import orjson

from server.bus.connection import Bus, mapped, pull, settle
from server.bus.tasks import (
    RESULT_ACK_WAIT_S, RESULTS_STREAM, TASKS_STREAM, cancel_subject, decode_result, encode_task, result_event, results_consumer,
    task_subject,
)
from server.engine.commands import ExecuteTask
from server.engine.events import Event
from server.errors import BadRequest, BatonError, BusError, RunNotFound
from server.runtime.clock import Clock
from server.telemetry.ids import task_span_id, traceparent
from server.runtime.executor import RunInfo

log = logging.getLogger("baton.remote")

RESULTS_BATCH = 256  # results decided per fetch: they share one group commit
FETCH_WAIT_S = 5.0  # a fetch long-polls this long when no result is waiting
RETRY_S = 1.0  # after a failed fetch, or a result the runtime could not take (store failing)
PUBLISH_RETRY_MAX_S = 30.0  # backoff cap while NATS does not take a task


def task_message(cmd: ExecuteTask, run: RunInfo, now: float) -> tuple[str, bytes, dict[str, str]]:
    """(subject, body, headers) of the message that hands an attempt to its queue's workers."""
    deadline = now + cmd.timeout_s if cmd.timeout_s is not None else None
    body = encode_task(cmd, run_id=run.run_id, workflow=run.workflow, version=run.version,
                       workflow_id=run.workflow_id, deadline=deadline)
    # the worker continues the attempt's span; with tracing off still the run's trace,
    # so the worker's log lines carry it
    trace_id = run.trace_id if run.trace_id is not None else run.log_trace_id
    return task_subject(cmd.queue), body, {"traceparent": traceparent(trace_id, task_span_id(cmd.task_id))}


class Reporter(Protocol):
    async def report(self, run_id: str, event: Event) -> None: ...


class _Sent:
    __slots__ = ("queue", "seq", "sending")

    def __init__(self, queue: str, sending: asyncio.Task) -> None:
        self.queue, self.sending = queue, sending
        self.seq: int | None = None  # its stream sequence, once NATS took it


class RemoteTasks:
    def __init__(self, bus: Bus, runtime: Reporter, clock: Clock, *, ack_wait_s: float = RESULT_ACK_WAIT_S) -> None:
        # replicas share the results consumer: what a killed one had fetched goes to another
        # after ack_wait_s, which must come before the attempt's heartbeat deadline (the
        # cluster passes half its lease), or the attempt is made again though it succeeded
        self.ack_wait_s = ack_wait_s
        self.bus = bus
        self.runtime = runtime
        self.clock = clock
        self._sent: dict[str, _Sent] = {}  # attempts in flight on a queue, by task id
        self._chores: set[asyncio.Task] = set()  # cancel notices on their way
        self._consumer: asyncio.Task | None = None
        self._sub: Any = None
        self._closed = False

    async def prepare(self) -> None:
        """Create the streams; before the runtime starts, since recovery sends tasks."""
        await self.bus.ensure_stream(TASKS_STREAM)
        await self.bus.ensure_stream(RESULTS_STREAM)

    # --- what the runtime calls (synchronously, after a commit) ---

    def submit(self, cmd: ExecuteTask, run: RunInfo) -> None:
        if self._closed or cmd.task_id in self._sent:
            return
        sending = asyncio.create_task(self._send(cmd, run), name=f"send {cmd.task_id}")
        self._sent[cmd.task_id] = _Sent(cmd.queue, sending)

    def cancel(self, task_id: str) -> None:
        sent = self._sent.pop(task_id, None)
        if sent is None or self._closed:
            return  # not a remote task of this process (a local one, or already settled)
        sent.sending.cancel()
        self._chore(self._withdraw(task_id, sent))

    # --- sending ---

    async def _send(self, cmd: ExecuteTask, run: RunInfo) -> None:
        subject, body, headers = task_message(cmd, run, self.clock.now())
        delay = RETRY_S
        while True:
            try:
                ack = await self.bus.publish(subject, body, headers=headers, msg_id=cmd.task_id)
            except BusError as exc:
                log.warning("cannot send task %s to queue %r (again in %.0fs): %s", cmd.task_id, cmd.queue, delay, exc.message)
                await asyncio.sleep(delay)
                delay = min(delay * 2, PUBLISH_RETRY_MAX_S)
                continue
            sent = self._sent.get(cmd.task_id)
            if sent is not None:
                sent.seq = ack.seq
            return

    async def _withdraw(self, task_id: str, sent: _Sent) -> None:
        """Best effort: a task no worker took is deleted; a worker running it is told to stop."""
        if sent.seq is not None:
            try:
                with mapped(f"cannot delete task {task_id}"):
                    await self.bus.js.delete_msg(TASKS_STREAM.name, sent.seq)
            except BusError:
                pass  # a worker took it already (a work queue deletes what is acked)
        try:
            with mapped(f"cannot send the cancel of {task_id}"):
                await self.bus.nc.publish(cancel_subject(sent.queue), orjson.dumps({"task_id": task_id}))
        except BusError as exc:
            log.info("%s", exc.message)  # its worker runs on; Baton ignores the result

    def _chore(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)

    # --- results ---

    async def start(self) -> None:
        """Consume results; after the runtime started (they feed it)."""
        config = results_consumer(max_ack_pending=RESULTS_BATCH * 4, ack_wait_s=self.ack_wait_s)
        with mapped("cannot subscribe to task results"):
            self._sub = self.bus.track(await self.bus.js.pull_subscribe(
                "baton.results.>", durable=config.durable_name, stream=RESULTS_STREAM.name, config=config))
        self._consumer = asyncio.create_task(self._consume(), name="baton-results")

    async def stop(self) -> None:
        """Stop consuming results; before the runtime stops."""
        if self._consumer is not None:
            self._consumer.cancel()
            await asyncio.gather(self._consumer, return_exceptions=True)
            self._consumer = None
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # the connection is gone: nothing to release
                pass
            self._sub = None

    async def close(self) -> None:
        """Drop what is still being sent; after the runtime stopped. The store keeps those
        attempts in flight, and the next start sends them again."""
        self._closed = True
        pending = [s.sending for s in self._sent.values()] + list(self._chores)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self._sent.clear()

    async def _consume(self) -> None:
        while True:
            try:
                msgs = await pull(self._sub, RESULTS_BATCH, FETCH_WAIT_S)
            except asyncio.TimeoutError:  # nothing waiting (nats' TimeoutError is one too)
                continue
            except Exception as exc:  # disconnected: nats-py reconnects by itself
                log.warning("fetching task results failed (again in %.0fs): %s", RETRY_S, exc or type(exc).__name__)
                await asyncio.sleep(RETRY_S)
                continue
            # in order: each report enters the runtime's inbox before the next one starts
            await asyncio.gather(*(self._take(msg) for msg in msgs))

    async def _take(self, msg: Any) -> None:
        try:
            result = decode_result(msg.data)
        except BadRequest as exc:
            log.error("dropping a malformed message on %s: %s", msg.subject, exc.message)
            await settle(msg.term)
            return
        try:
            await self.runtime.report(result.run_id, result_event(result, self.clock.now(), self.clock.jitter()))
        except RunNotFound:
            log.warning("dropping a %s result of task %s: no such run", result.type, result.task_id)
            await settle(msg.term)
            return
        except BatonError as exc:  # the store is failing, or Baton is stopping: later
            log.warning("cannot take the %s result of task %s yet: %s", result.type, result.task_id, exc.message)
            await settle(msg.nak, RETRY_S)
            return
        if result.terminal:
            self._sent.pop(result.task_id, None)
        await settle(msg.ack)

