"""Event triggers: JetStream messages start workflow runs, each exactly once.

    stream (captures every trigger subject) ──> durable pull consumer
        ──> parse (CloudEvents structured / binary / plain JSON)
        ──> seen before? (events table)           yes: ack, nothing starts
        ──> each matching trigger: filter, render input and workflow_id,
            start the run under an id derived from (event key, workflow, trigger)
        ──> record the event (and any dead letters) ──> ack

Nothing is acknowledged before what it caused is committed, so a crash at any
point means redelivery, not loss. Redelivery cannot double a run: the events
row says the event was handled, and if the crash came before that row, the run
ids derived from the event's key find the runs already started.

Errors that belong to the event (not JSON, input against the schema, a template
that fails) dead-letter it: recorded, published on `baton.dlq.<subject>` through
the outbox, acknowledged. Errors of the moment (store, NATS, shutting down) nak
it for a later redelivery. A workflow at its concurrency limit also naks: the
message waits in the stream, not in memory.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Any

import nats.errors
import orjson
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StreamConfig

from server.bus.cloudevents import EventError, parse_event
from server.bus.connection import Bus, mapped, pull, settle
from server.definitions.triggers import CompiledEventTrigger, compile_event_trigger, minimal_subjects
from server.errors import BatonError, Conflict, ExpressionError, InvalidInput, NotFound
from server.runtime.runner import Runtime
from server.settings import Nats as NatsSettings
from server.store.base import Batch, DeadLetterRow, EventRow, OutboxRow, Store

log = logging.getLogger("baton.triggers")

CONSUMER = "baton-triggers"
FETCH_BATCH = 128  # messages asked for per pull, within the in-flight bound
FETCH_WAIT_S = 1.0  # a pull waits this long for messages (long poll), then asks again
# Unacknowledged this long, a message is redelivered: after a crash, the events that
# were in flight wait this long. Handling one takes milliseconds (a commit).
ACK_WAIT_S = 10.0
RETRY_DELAY_S = 1.0  # nak delay after a passing failure, doubled per delivery
RETRY_DELAY_MAX_S = 30.0
STOP_GRACE_S = 5.0
PRUNE_EVERY_S = 3600.0
# Errors that are the event's fault: the same event would fail again, so it is dead-lettered.
_EVENT_ERRORS = (ExpressionError, InvalidInput, NotFound, Conflict)


@dataclass(frozen=True)
class _Trigger:
    workflow: str
    index: int
    compiled: CompiledEventTrigger


class AtCapacity(Exception):
    pass


def event_run_id(key: str, workflow: str, index: int) -> str:
    """The run an event starts through one trigger: the same on every delivery."""
    return hashlib.sha256(f"{key}\n{workflow}\n{index}".encode()).hexdigest()[:32]


def _header_value(text: str) -> str:
    return re.sub(r"[\r\n]+", " ", text)[:1000]


class EventTriggers:
    def __init__(self, bus: Bus, runtime: Runtime, store: Store, settings: NatsSettings) -> None:
        self.bus, self.runtime, self.store, self.settings = bus, runtime, store, settings
        self.stream = settings.stream.name
        self.triggers = self._collect()
        self.stats = {"received": 0, "started": 0, "duplicates": 0, "unmatched": 0, "dead_lettered": 0, "retried": 0}
        self._sub: Any = None
        self._task: asyncio.Task | None = None
        self._inflight: set[asyncio.Task] = set()
        self._last_prune = 0.0

    def _collect(self) -> list[_Trigger]:
        found = []
        catalog = self.runtime.catalog
        for name in catalog.names():
            loaded = catalog.latest(name)
            for i, trigger in enumerate(loaded.model.triggers):
                if trigger.event is not None:
                    found.append(_Trigger(name, i, compile_event_trigger(trigger.event)))
        return found

    @property
    def subjects(self) -> list[str]:
        return minimal_subjects([t.compiled.subject for t in self.triggers])

    async def start(self) -> None:
        if not self.triggers:
            log.info("no event triggers: not consuming from NATS")
            return
        s = self.settings.stream
        await self.bus.ensure_stream(StreamConfig(
            name=self.stream, subjects=self.subjects, retention=RetentionPolicy(s.retention),
            max_age=s.max_age_s or None, max_bytes=s.max_bytes, num_replicas=s.replicas, duplicate_window=120.0,
        ))
        config = ConsumerConfig(
            durable_name=CONSUMER, ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL,
            ack_wait=ACK_WAIT_S, max_deliver=-1, max_ack_pending=self.settings.max_inflight_events,
        )
        with mapped(f"cannot set up consumer {CONSUMER} on {self.stream}"):
            await self.bus.js.add_consumer(self.stream, config)
            self._sub = self.bus.track(await self.bus.js.pull_subscribe_bind(CONSUMER, self.stream))
        self._task = asyncio.create_task(self._fetch_loop(), name="baton-event-triggers")
        log.info("event triggers: %d on %s (stream %s)", len(self.triggers), ", ".join(self.subjects), self.stream)

    async def consumer_lag(self) -> tuple[int, int] | None:
        """(events in the stream not yet delivered to us, delivered but not acknowledged);
        None when not consuming (no event triggers)."""
        if self._sub is None:
            return None
        with mapped(f"cannot read consumer {CONSUMER} on {self.stream}"):
            info = await self.bus.js.consumer_info(self.stream, CONSUMER)
        return info.num_pending or 0, info.num_ack_pending or 0

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._inflight:
            # started runs are committed by the runtime, which stops after us
            _, late = await asyncio.wait(self._inflight, timeout=STOP_GRACE_S)
            for task in late:
                task.cancel()  # unacknowledged: redelivered after the restart
            await asyncio.gather(*late, return_exceptions=True)

    # -- consuming --

    async def _fetch_loop(self) -> None:
        limit = self.settings.max_inflight_events
        backoff = 0.1
        while True:
            if len(self._inflight) >= limit:
                await asyncio.wait(self._inflight, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                msgs = await pull(self._sub, min(FETCH_BATCH, limit - len(self._inflight)), FETCH_WAIT_S)
            except asyncio.TimeoutError:  # nothing to fetch (nats-py raises either TimeoutError)
                await self._maybe_prune()
                continue
            except nats.errors.Error as exc:  # disconnected: nats-py reconnects, we wait and ask again
                log.debug("fetch failed: %r; retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            for msg in msgs:
                task = asyncio.create_task(self._handle(msg))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)

    async def _handle(self, msg: Any) -> None:
        self.stats["received"] += 1
        if msg.metadata and msg.metadata.num_delivered > 1:
            self.runtime.metrics.event_redeliveries.inc()
        try:
            await self._process(msg)
        except AtCapacity:
            await self._nak(msg)
        except BatonError as exc:
            log.warning("event on %s: %s; redelivering later", msg.subject, exc.message)
            await self._nak(msg)
        except Exception:
            log.exception("event on %s: unexpected error; redelivering later", msg.subject)
            await self._nak(msg)

    async def _nak(self, msg: Any) -> None:
        self.stats["retried"] += 1
        delivered = msg.metadata.num_delivered if msg.metadata else 1
        await settle(msg.nak, min(RETRY_DELAY_S * 2 ** max(0, delivered - 1), RETRY_DELAY_MAX_S))

    async def _process(self, msg: Any) -> None:
        seq = msg.metadata.sequence.stream if msg.metadata else None
        headers = dict(msg.headers or {})
        now = self.runtime.clock.now()
        try:
            event, key = parse_event(msg.subject, headers, msg.data, stream_seq=seq)
        except EventError as exc:
            batch = Batch()
            self._dead_letter(batch, msg.subject, headers, msg.data, None, None, str(exc), now)
            await self._commit(batch)
            await msg.ack()
            return
        if await self.store.get_event(key) is not None:
            self.stats["duplicates"] += 1
            await msg.ack()
            return
        batch = Batch()
        runs = await self.start_runs(event, key, msg.subject, headers, msg.data, batch, now)
        outcome = "started" if any("run_id" in r for r in runs) else "dead_lettered" if runs else "unmatched"
        if outcome == "unmatched":
            self.stats["unmatched"] += 1
        batch.events.append(EventRow(key, msg.subject, now, outcome, orjson.dumps(runs)))
        await self._commit(batch)
        await msg.ack()

    async def _commit(self, batch: Batch) -> None:
        await self.store.commit(batch)
        self.runtime.metrics.dead_lettered(batch.dead_letters)
        if batch.outbox and self.runtime.outbox_written is not None:
            self.runtime.outbox_written()  # dead letters go out through the outbox

    async def start_runs(self, event: dict[str, Any], key: str, subject: str, headers: dict[str, str], data: bytes,
                         batch: Batch, now: float, only: str | None = None) -> list[dict[str, Any]]:
        """Start a run for each trigger the event satisfies; dead letters go into `batch`.
        Returns what happened per trigger: {"workflow", "run_id", "created"} or {"workflow", "error"}."""
        results = []
        for trigger in self.triggers:
            if not trigger.compiled.matches(subject) or (only is not None and trigger.workflow != only):
                continue
            try:
                if not trigger.compiled.accepts(event):
                    continue
                input = trigger.compiled.render_input(event)
                if self.runtime.at_capacity(trigger.workflow, input, event):
                    raise AtCapacity(trigger.workflow)
                summary, created = await self.runtime.start_run(
                    trigger.workflow, input, workflow_id=trigger.compiled.render_workflow_id(event), event=event,
                    by=f"event:{subject}", run_id=event_run_id(key, trigger.workflow, trigger.index))
            except _EVENT_ERRORS as exc:
                message = f"trigger {trigger.index} of workflow {trigger.workflow!r}: {exc.message}"
                self._dead_letter(batch, subject, headers, data, key, trigger.workflow, message, now)
                results.append({"workflow": trigger.workflow, "error": message})
                continue
            self.stats["started"] += created
            results.append({"workflow": trigger.workflow, "run_id": summary["run_id"], "created": created})
        return results

    def _dead_letter(self, batch: Batch, subject: str, headers: dict[str, str], data: bytes, key: str | None,
                     workflow: str | None, error: str, now: float) -> None:
        self.stats["dead_lettered"] += 1
        log.warning("dead letter from %s: %s", subject, error)
        batch.dead_letters.append(DeadLetterRow(None, now, subject, key, workflow, error, orjson.dumps(headers), data))
        out_headers = {k: v for k, v in headers.items() if k.lower() != "nats-msg-id"}
        out_headers.update({"Baton-Error": _header_value(error), "Baton-Original-Subject": subject})
        if workflow:
            out_headers["Baton-Workflow"] = workflow
        msg_id = f"dlq:{key or hashlib.sha256(data).hexdigest()}:{workflow or ''}"
        batch.outbox.append(OutboxRow(None, f"baton.dlq.{subject}", msg_id, orjson.dumps(out_headers), data))

    async def _maybe_prune(self) -> None:
        now = self.runtime.clock.now()
        if now - self._last_prune < PRUNE_EVERY_S:
            return
        self._last_prune = now
        try:
            await self.store.commit(Batch(events_pruned_before=now - self.settings.dedupe_window_s))
        except BatonError as exc:
            log.warning("pruning old event records failed: %s", exc.message)

    # -- dead letters --

    async def replay(self, dead_letter_id: int) -> dict[str, Any]:
        """Run a dead letter's event through its trigger(s) again, e.g. after fixing the workflow."""
        row = await self.store.get_dead_letter(dead_letter_id)
        if row is None:
            raise NotFound(f"unknown dead letter {dead_letter_id}", field="id")
        if row.replayed_at is not None:
            raise Conflict(f"dead letter {dead_letter_id} was already replayed (run {row.replay_run})")
        headers = orjson.loads(row.headers)
        try:
            event, key = parse_event(row.subject, headers, row.data, stream_seq=None)
        except EventError as exc:
            raise InvalidInput(f"the event still cannot be read: {exc}") from None
        now = self.runtime.clock.now()
        batch = Batch()
        results = await self.start_runs(event, row.event_key or key, row.subject, headers, row.data, batch,
                                        now, only=row.workflow)
        errors = [r["error"] for r in results if "error" in r]
        if errors:
            raise InvalidInput(f"replay failed again: {errors[0]}")
        started = [r for r in results if "run_id" in r]
        if not started:
            raise Conflict("the event matches no trigger now (its filter is false or the trigger is gone)")
        batch.dead_letters_replayed.append((dead_letter_id, now, started[0]["run_id"]))
        await self.store.commit(batch)
        return {"id": dead_letter_id, "runs": started}

