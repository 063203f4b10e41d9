"""The outbox publisher: messages committed with a transition reach NATS after it.

The runtime writes lifecycle events (and the trigger consumer writes dead
letters) as outbox rows in the same transaction as the change they report.
This task publishes them into JetStream in commit order, pipelined, and deletes
the rows the stream acknowledged. A crash between publish and delete publishes
a row again with the same `Nats-Msg-Id`: the stream's duplicate window drops the
copy, and the CloudEvent `id` is the same for any consumer that dedupes itself.
While NATS is away, rows accumulate in the store and go out after reconnect.

Deletes are coalesced: acknowledged rows are deleted together, at most
`DELETE_AFTER_S` after the first of them was acknowledged (or once there are
`BATCH_ROWS`), not one transaction per round; a cursor over the ids, which only
grow (AUTOINCREMENT), keeps them from being published again meanwhile. A run
one at a time otherwise paid a delete transaction for each of its transitions.
The delay is far inside the streams' duplicate window, so a crash before the
delete still republishes only copies that the stream drops.
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
DELETE_AFTER_S = 1.0  # acknowledged rows wait at most this long for their delete (<< duplicate_window)
# Replicas: an id the cursor passed without seeing it may belong to a transaction still
# open (it commits in milliseconds) or rolled back (never). It is looked for again, for
# this long, at each round; after it only the rescan finds it.
HOLE_GRACE_S = 2.0
MAX_HOLES = 4 * BATCH_ROWS  # more ids skipped at once than this: left to the rescan

# Baton's own streams for what it publishes (consumers may replay them)
LIFECYCLE_STREAM = StreamConfig(name="BATON_LIFECYCLE", subjects=["baton.run.>", "baton.step.>"],
                                max_age=86400.0, duplicate_window=120.0)
DLQ_STREAM = StreamConfig(name="BATON_DLQ", subjects=["baton.dlq.>"], max_age=30 * 86400.0, duplicate_window=120.0)


class OutboxPublisher:
    def __init__(self, bus: Bus, store: Store, *, rescan_s: float | None = None) -> None:
        self.bus = bus
        self.store = store
        # replicas sharing a database: ids are drawn when a row is inserted, not when its
        # transaction commits, so a row may commit below the cursor: another replica's, or
        # this one's while it read another's. The ids the cursor skipped are looked for
        # again each round (this replica's commit wakes it), and every rescan_s the cursor
        # starts from 0 again (the table holds only rows in flight).
        self.rescan_s = rescan_s
        self._rescan_due: float | None = None
        self._holes: dict[int, float] = {}  # id skipped -> until when to look for it
        self._high = 0  # the highest id read so far
        self.published = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._cursor = 0  # rows up to this id were published once (the refused ones are in _retry)
        self._retry: list[OutboxRow] = []
        self._acked: list[int] = []  # published, not yet deleted
        self._delete_due: float | None = None  # loop time by which _acked must be deleted

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
        loop = asyncio.get_running_loop()
        while True:
            if not self._stopping:
                due = [t for t in (self._delete_due, self._rescan_due) if t is not None]
                await self._sleep(min(due) - loop.time() if due else None)
            if self.rescan_s is not None and loop.time() >= (self._rescan_due or 0.0):
                self._cursor, self._rescan_due = 0, loop.time() + self.rescan_s
            self._wake.clear()
            try:
                try:
                    await self._round()
                finally:  # a refused row must not keep the acknowledged ones from their delete
                    if self._acked and (self._stopping or len(self._acked) >= BATCH_ROWS
                                        or loop.time() >= (self._delete_due or 0.0)):
                        await self._delete()
                delay = 0.1
            except BatonError as exc:
                log.warning("outbox: %s; retrying in %.1fs", exc.message, delay)
                if self._stopping:
                    return
                await self._sleep(delay)  # a retry delay, cut short by new rows
                self._wake.set()
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            if self._stopping:
                return

    async def _sleep(self, timeout_s: float | None) -> None:
        """Until woken by new rows, or `timeout_s` (None: no limit) has passed."""
        try:
            await asyncio.wait_for(self._wake.wait(), timeout_s)
        except asyncio.TimeoutError:
            pass

    async def _round(self) -> None:
        """Publish the refused rows again, then every row committed since; BusError if some
        are still refused. A refused row does not hold up the rows behind it (a stream an
        operator deleted blocks only its own subjects), but a round where nothing was
        acknowledged (NATS away) stops reading, so a backlog stays in the store, not here."""
        if self._retry:
            self._retry = await self._publish(self._retry)
        if self._holes:
            await self._fill_holes()
        while len(self._retry) < BATCH_ROWS and (page := await self.store.outbox_pending(BATCH_ROWS, self._cursor)):
            if self.rescan_s is not None:
                self._note_holes(page)
            self._cursor = max(self._cursor, page[-1].id)
            rows = page
            if self._acked or self._retry:  # after a rescan: not again what waits for its delete or retry
                held = {*self._acked, *(r.id for r in self._retry)}
                rows = [r for r in page if r.id not in held]
            refused = await self._publish(rows) if rows else []
            self._retry += refused
            # a short page means caught up: a row committed since has set _wake for the next round
            if (rows and len(refused) == len(rows)) or len(page) < BATCH_ROWS:
                break
        if self._retry:
            raise BusError(f"{len(self._retry)} messages were not acknowledged by their stream")

    def _note_holes(self, page: list[OutboxRow]) -> None:
        """The ids between the cursor and the page's last that the page lacks."""
        top, low = page[-1].id, max(self._cursor, self._high)  # below `_high`: noted already (a rescan reads again)
        self._high = max(self._high, top)
        if top - low > MAX_HOLES:  # a jump (a start on an old table): the rescans' job
            return
        seen = {row.id for row in page}
        until = asyncio.get_running_loop().time() + HOLE_GRACE_S
        for row_id in range(low + 1, top):
            if row_id not in seen:
                self._holes.setdefault(row_id, until)

    async def _fill_holes(self) -> None:
        """Publish the skipped rows committed since."""
        now = asyncio.get_running_loop().time()
        self._holes = {row_id: until for row_id, until in self._holes.items() if until > now}
        if not self._holes:
            return
        found = await self.store.outbox_rows(sorted(self._holes))
        for row in found:
            del self._holes[row.id]
        if found:
            self._retry += await self._publish(found)

    async def _publish(self, rows: list[OutboxRow]) -> list[OutboxRow]:
        """Publish `rows`; returns those their stream did not acknowledge."""
        messages = [(r.subject, r.data, {**orjson.loads(r.headers), "Nats-Msg-Id": r.msg_id}) for r in rows]
        acked = await self.bus.publish_many(messages)
        done = [row.id for row, ok in zip(rows, acked) if ok]
        if done:
            if not self._acked:
                self._delete_due = asyncio.get_running_loop().time() + DELETE_AFTER_S
            self._acked += done
            self.published += len(done)
        return [row for row, ok in zip(rows, acked) if not ok]

    async def _delete(self) -> None:
        await self.store.commit(Batch(outbox_deleted=self._acked))
        self._acked, self._delete_due = [], None
