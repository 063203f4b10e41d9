"""The outbox publisher: messages committed with a transition reach NATS after it.

The runtime writes lifecycle events (and the trigger consumer writes dead
letters) as outbox rows in the same transaction as the change they report.
This task publishes them into JetStream in commit order, pipelined, and deletes
the rows the stream acknowledged. A crash between publish and delete publishes
a row again with the same `Nats-Msg-Id`: the stream's duplicate window drops the
copy, and the CloudEvent `id` is the same for any consumer that dedupes itself.
While NATS is away, rows accumulate in the store and go out after reconnect.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
from nats.js.api import StreamConfig

from server.bus.connection import Bus
from server.errors import BatonError, BusError
from server.store.base import Batch, OutboxRow, Store

log = logging.getLogger("baton.outbox")

BATCH_ROWS = 512  # rows per round: one read, one pipelined publish, one delete
RETRY_MAX_S = 5.0  # backoff cap while NATS or the store fails
FLUSH_ON_STOP_S = 3.0  # how long stop() keeps publishing what is left

# Baton's own streams for what it publishes (consumers may replay them)
LIFECYCLE_STREAM = StreamConfig(name="BATON_LIFECYCLE", subjects=["baton.run.>", "baton.step.>"],
                                max_age=86400.0, duplicate_window=120.0)
DLQ_STREAM = StreamConfig(name="BATON_DLQ", subjects=["baton.dlq.>"], max_age=30 * 86400.0, duplicate_window=120.0)


class OutboxPublisher:
    def __init__(self, bus: Bus, store: Store) -> None:
        self.bus = bus
        self.store = store
        self.published = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False

    async def start(self) -> None:
        for config in (LIFECYCLE_STREAM, DLQ_STREAM):
            await self.bus.ensure_stream(config)
        self._wake.set()  # rows left by the previous process go out first
        self._task = asyncio.create_task(self._loop(), name="baton-outbox")

    def wake(self) -> None:
        self._wake.set()

    async def stop(self) -> None:
        if self._task is None:
            return
        self._stopping = True
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), FLUSH_ON_STOP_S)
        except asyncio.TimeoutError:
            log.warning("outbox: unpublished rows remain; they go out after the restart")
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None

    async def _loop(self) -> None:
        delay = 0.1
        while True:
            if not self._stopping:
                await self._wake.wait()
            self._wake.clear()
            try:
                while rows := await self.store.outbox_pending(BATCH_ROWS):
                    await self._publish(rows)
                delay = 0.1
            except BatonError as exc:
                log.warning("outbox: %s; retrying in %.1fs", exc.message, delay)
                if self._stopping:
                    return
                try:  # a retry delay, cut short by new rows
                    await asyncio.wait_for(self._wake.wait(), delay)
                except asyncio.TimeoutError:
                    pass
                self._wake.set()
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            if self._stopping:
                return

    async def _publish(self, rows: list[OutboxRow]) -> None:
        messages = [(r.subject, r.data, {**orjson.loads(r.headers), "Nats-Msg-Id": r.msg_id}) for r in rows]
        acked = await self.bus.publish_many(messages)
        done = [row.id for row, ok in zip(rows, acked) if ok]
        if done:
            await self.store.commit(Batch(outbox_deleted=done))
            self.published += len(done)
        if len(done) < len(rows):
            raise BusError(f"{len(rows) - len(done)} of {len(rows)} messages were not acknowledged by their stream")
