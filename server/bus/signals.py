"""Signals over NATS: a message on `baton.signal.<run_id>.<name>` delivers a signal,
as `POST /v1/runs/{run_id}/signals/{name}` does.

    subject   baton.signal.<run_id>.<name>   (a name may contain dots: every token
                                              after the run id belongs to it)
    body      the payload as JSON; an empty body is null
    header    Baton-By: who sent it (recorded in the run's history; default "nats")
    reply     {"ok": true, "run": <run summary>}
              {"ok": false, "error": {"code", "message", "field"?}}   (the HTTP codes)

Delivery is core NATS, so a plain publish is **at-most-once**: if no Baton is
subscribed at that moment (restarting, or the broker dropped it for a slow
consumer), the signal is gone and nobody is told. Use request/reply to know that
the signal landed: the reply comes only after the signal is committed to the store,
and no reply (a timeout) means "send it again" — sending twice is safe, because the
second one finds no step waiting and gets a `conflict` error reply.

Anyone who may publish on `baton.signal.>` may approve any run: restrict that
subject with NATS permissions as you would restrict the approver role over HTTP.

The subscription is in a queue group, so several Baton replicas share the signals
and each one is handled once. Each message is handled in its own task (one slow
signal does not hold up the others), at most `MAX_INFLIGHT_SIGNALS` at a time;
beyond that, messages wait in the subscription's buffer.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import nats.errors
import orjson
from nats.aio.msg import Msg

from server.bus.connection import Bus, flush_all, mapped
from server.errors import BadJson, BadRequest, BatonError, PayloadTooLarge
from server.runtime.base import Orchestrator

log = logging.getLogger("baton.signals")

SUBJECT_PREFIX = "baton.signal"
SUBJECTS = f"{SUBJECT_PREFIX}.>"
QUEUE_GROUP = "baton-signals"
BY_HEADER = "Baton-By"
DEFAULT_BY = "nats"
MAX_BY_CHARS = 256  # a name or an address, not a document: it is stored with every signal
# Signals handled at once. Each is one small transition through the runtime's group
# commit, so a few dozen keep its batches full; more would only pile up tasks.
MAX_INFLIGHT_SIGNALS = 64
# Messages nats-py buffers for the subscription while all slots are busy; past this it
# drops them and reports a slow consumer (requesters time out and may send again).
PENDING_MSGS_LIMIT = 10_000
STOP_TIMEOUT_S = 5.0  # stop() waits this long for signals in flight, then cancels them


def parse_subject(subject: str) -> tuple[str, str]:
    """`baton.signal.<run_id>.<name>` -> (run_id, name); BadRequest when a part is missing."""
    prefix = SUBJECT_PREFIX + "."
    parts = subject[len(prefix):].split(".", 1) if subject.startswith(prefix) else []
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise BadRequest(
            f"malformed signal subject {subject!r}: expected {SUBJECT_PREFIX}.<run_id>.<name>", field="subject"
        )
    return parts[0], parts[1]


def parse_payload(data: bytes, max_bytes: int | None) -> Any:
    """The message body as JSON; empty is null. Errors match the HTTP API's."""
    if max_bytes is not None and len(data) > max_bytes:
        raise PayloadTooLarge(f"signal payload is {len(data)} bytes; the limit is {max_bytes}")
    if not data.strip():
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise BadJson(f"invalid JSON at line {exc.lineno} column {exc.colno} (char {exc.pos}): {exc.msg}") from None


def sender(headers: dict[str, str] | None) -> str:
    by = ((headers or {}).get(BY_HEADER) or "").strip() or DEFAULT_BY
    if len(by) > MAX_BY_CHARS:
        raise BadRequest(f"{BY_HEADER} header is {len(by)} characters; the limit is {MAX_BY_CHARS}", field=BY_HEADER)
    return by


class SignalListener:
    """Subscribes to `baton.signal.>` and hands each signal to the runtime."""

    def __init__(self, bus: Bus, runtime: Orchestrator, *, max_payload_bytes: int | None = None,
                 max_inflight: int = MAX_INFLIGHT_SIGNALS) -> None:
        self.bus = bus
        self.runtime = runtime
        self.max_payload_bytes = max_payload_bytes
        self._slots = asyncio.Semaphore(max_inflight)
        self._tasks: set[asyncio.Task] = set()
        self._sub: Any = None

    async def start(self) -> None:
        with mapped(f"cannot subscribe to {SUBJECTS}"):
            self._sub = self.bus.track(await self.bus.nc.subscribe(
                SUBJECTS, queue=QUEUE_GROUP, cb=self._on_message, pending_msgs_limit=PENDING_MSGS_LIMIT,
            ))
            await flush_all(self.bus.nc)
        log.info("listening for signals on %s (queue group %s)", SUBJECTS, QUEUE_GROUP)

    async def stop(self) -> None:
        """Stop taking signals, let those already received finish (bounded), then return."""
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                # drain, not unsubscribe: messages already buffered get their replies
                await asyncio.wait_for(sub.drain(), STOP_TIMEOUT_S)
            except (nats.errors.Error, asyncio.TimeoutError) as exc:
                log.warning("signal subscription did not drain cleanly: %s", exc or type(exc).__name__)
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=STOP_TIMEOUT_S)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
                log.warning("%d signals were still being handled after %.0fs and were cut short",
                            len(pending), STOP_TIMEOUT_S)

    async def _on_message(self, msg: Msg) -> None:
        # Runs in the subscription's delivery loop: waiting here for a slot is the backpressure.
        await self._slots.acquire()
        task = asyncio.create_task(self._handle(msg), name=f"baton-signal {msg.subject}")
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _handle(self, msg: Msg) -> None:
        try:
            run_id, name = parse_subject(msg.subject)
            payload = parse_payload(msg.data, self.max_payload_bytes)
            run = await self.runtime.signal(run_id, name, payload, by=sender(msg.headers))
            reply: dict[str, Any] = {"ok": True, "run": run}
        except BatonError as exc:
            reply = {"ok": False, "error": exc.to_dict()}
            if not msg.reply:
                log.warning("signal on %s was not delivered: %s: %s", msg.subject, exc.code, exc.message)
        except Exception:  # one bad signal must not take the listener down
            log.exception("signal on %s failed", msg.subject)
            reply = {"ok": False, "error": {"code": "internal", "message": "internal error delivering the signal"}}
        if msg.reply:
            await self._respond(msg, reply)

    async def _respond(self, msg: Msg, reply: dict[str, Any]) -> None:
        try:
            await msg.respond(orjson.dumps(reply))
        except nats.errors.Error as exc:
            # the signal itself is committed (or refused); only the requester misses the answer
            log.warning("cannot reply to the signal on %s: %s", msg.subject, exc or type(exc).__name__)
