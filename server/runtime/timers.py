"""Durable timers: rows in the store, a heap in memory for the near horizon.

The store holds every timer; the heap holds only those due within `horizon_s`, so a
million sleeping runs cost a million rows, not a million heap entries. A refill
loads the next window from the store before it is needed. Cancelled timers are
dropped lazily: an entry fires only if it still matches the armed table. A timer
that fires is handed to `on_fire`; the engine ignores one that is no longer armed,
so a duplicate firing after a restart changes nothing.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Callable

from server.runtime.clock import Clock
from server.store.base import Store

log = logging.getLogger("baton.timers")

HORIZON_S = 300.0  # timers due within 5 minutes live in memory; the rest only in the store
REFILL_BATCH = 50_000
REFILL_RETRY_S = 1.0


class Timers:
    def __init__(self, store: Store, clock: Clock, on_fire: Callable[[str, str], None]) -> None:
        self._store = store
        self._clock = clock
        self._on_fire = on_fire
        self._heap: list[tuple[float, str, str]] = []
        self._armed: dict[tuple[str, str], float] = {}
        self._horizon = 0.0  # every stored timer due before this is in the heap
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False

    async def start(self) -> None:
        await self._refill()
        self._task = asyncio.create_task(self._loop(), name="baton-timers")

    async def stop(self) -> None:
        if self._task is not None:
            # Python 3.11's wait_for can swallow a cancel that races with the event it
            # waits for; the flag ends the loop even then.
            self._stopping = True
            self._wake.set()
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def arm(self, run_id: str, timer_id: str, fire_at: float) -> None:
        """Called after the timer's row is committed."""
        if fire_at > self._horizon:
            return  # the refill will bring it in when its window comes
        self._push(run_id, timer_id, fire_at)

    def disarm(self, run_id: str, timer_id: str) -> None:
        self._armed.pop((run_id, timer_id), None)

    def __len__(self) -> int:
        return len(self._armed)

    def _push(self, run_id: str, timer_id: str, fire_at: float) -> None:
        if self._armed.get((run_id, timer_id)) == fire_at:
            return
        self._armed[(run_id, timer_id)] = fire_at
        heapq.heappush(self._heap, (fire_at, run_id, timer_id))
        if self._heap[0][0] == fire_at:
            self._wake.set()

    async def _refill(self) -> None:
        until = self._clock.now() + HORIZON_S
        rows = await self._store.due_timers(until, REFILL_BATCH)
        for row in rows:
            self._push(row.run_id, row.timer_id, row.fire_at)
        # a full batch means more may be due before `until`: take the window only as far as we read
        self._horizon = rows[-1].fire_at if len(rows) == REFILL_BATCH else until

    async def _loop(self) -> None:
        while not self._stopping:
            now = self._clock.now()
            while self._heap and self._heap[0][0] <= now:
                fire_at, run_id, timer_id = heapq.heappop(self._heap)
                if self._armed.get((run_id, timer_id)) == fire_at:
                    del self._armed[(run_id, timer_id)]
                    self._on_fire(run_id, timer_id)
            if now >= self._horizon - HORIZON_S / 2:
                try:
                    await self._refill()
                except Exception:  # a failing store must not kill the timer loop
                    log.exception("timer refill failed; retrying in %.0fs", REFILL_RETRY_S)
                    await asyncio.sleep(REFILL_RETRY_S)  # back off instead of spinning on a broken store
                continue
            wait_s = min(self._heap[0][0] - now if self._heap else HORIZON_S, self._horizon - HORIZON_S / 2 - now)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(wait_s, 0.0))
            except asyncio.TimeoutError:
                pass
