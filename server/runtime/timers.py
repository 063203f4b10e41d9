"""Durable timers: rows in the store, a heap in memory for the near horizon.

The store holds every timer; the heap holds only those due within `HORIZON_S`, so
a million sleeping runs cost a million rows, not a million heap entries. A refill
loads the next window from the store before it is needed. The loop waits through
the Clock (`sleep_until`), so a test clock moves durable time by hand.

Rules, and why:
* `arm` is called after a timer's row is committed, `disarm` after its delete is.
  A timer due beyond the horizon stays in the store only; the refill brings it in.
* A refill reads a snapshot. Timers armed while it is in flight are pushed if due
  within the window being loaded (else the snapshot, taken before their commit,
  would miss them and the horizon would claim they were loaded); timers disarmed
  or settled while it is in flight are not pushed back from the stale snapshot.
* A timer that fires is handed to `on_fire`; its row is deleted by the commit of
  that firing, which may come much later when the runtime is busy. Until the
  runtime calls `settled`, a refill skips the row (else a backlog would be fired
  again and again, adding to the backlog). A row still there after `settled` lost
  its firing to a failed commit: the next refill fires it again (the engine ignores
  a timer that is no longer armed, so a repeat changes nothing).
* Cancelled timers are dropped lazily: a heap entry fires only if it still matches
  the armed table; the heap is rebuilt when most of it is such leftovers.
* A refill that hits REFILL_BATCH cannot tell how far the window reaches; it takes
  the horizon only as far as it read, and reads again half a horizon before that,
  but never sooner than FULL_REFILL_GAP_S: a crowded window (more due than a batch,
  or a backlog the runtime has not committed yet) is re-read at that pace, not in a
  busy loop.
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
FULL_REFILL_GAP_S = 1.0  # a full batch is read again at most this often while the window is crowded

Key = tuple[str, str]  # (run_id, timer_id)


class Timers:
    def __init__(self, store: Store, clock: Clock, on_fire: Callable[[str, str], None], *,
                 refill_s: float | None = None) -> None:
        self._store = store
        self._refill_s = refill_s  # read the store at least this often (timers armed by other processes)
        self._clock = clock
        self._on_fire = on_fire
        self._heap: list[tuple[float, str, str]] = []
        self._armed: dict[Key, float] = {}
        self._horizon = 0.0  # every stored timer due at or before this is in memory (or fired)
        self._next_refill = 0.0  # clock time of the next refill
        self._refilling: float | None = None  # the `until` of a refill in flight
        self._dropped: set[Key] = set()  # disarmed while a refill was in flight
        self._fired: dict[Key, float] = {}  # handed to on_fire, not yet settled: key -> fire_at
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self._refill()
        self._task = asyncio.create_task(self._loop(), name="baton-timers")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def arm(self, run_id: str, timer_id: str, fire_at: float) -> None:
        """Called after the timer's row is committed."""
        if fire_at > max(self._horizon, self._refilling or 0.0):
            return  # the refill will bring it in when its window comes
        self._push(run_id, timer_id, fire_at)

    def disarm(self, run_id: str, timer_id: str) -> None:
        """Called after the timer's delete is committed."""
        key = (run_id, timer_id)
        self._armed.pop(key, None)
        if self._refilling is not None:
            self._dropped.add(key)
        if len(self._heap) > 1024 and len(self._heap) > 4 * len(self._armed):
            # mostly leftovers of cancelled timers (step timeouts of steps that finished): compact
            self._heap = [(t, r, i) for (r, i), t in self._armed.items()]
            heapq.heapify(self._heap)

    def settled(self, keys: list[Key]) -> None:
        """Called once the runtime has processed these firings: committed (the rows are
        gone) or failed (the rows stay, and the next refill fires them again)."""
        for key in keys:
            self._fired.pop(key, None)
            if self._refilling is not None:
                # the refill in flight may have read the row before its delete was committed;
                # a row a failed commit left behind is read again by the next refill
                self._dropped.add(key)

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
        self._refilling, self._dropped = until, set()
        try:
            rows = await self._store.due_timers(until, REFILL_BATCH)
        finally:
            self._refilling = None
        dropped, self._dropped = self._dropped, set()
        for row in rows:
            key = (row.run_id, row.timer_id)
            if key in dropped or self._fired.get(key) == row.fire_at:
                continue  # the snapshot, or the store, has not caught up with its delete yet
            self._push(row.run_id, row.timer_id, row.fire_at)
        # a full batch: more may be due before `until`, so take the window only as far as we read
        self._horizon = rows[-1].fire_at if len(rows) == REFILL_BATCH else until
        self._next_refill = max(self._horizon - HORIZON_S / 2, self._clock.now() + FULL_REFILL_GAP_S)
        if self._refill_s is not None:
            self._next_refill = min(self._next_refill, self._clock.now() + self._refill_s)

    def _fire_due(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            fire_at, run_id, timer_id = heapq.heappop(self._heap)
            key = (run_id, timer_id)
            if self._armed.get(key) == fire_at:
                del self._armed[key]
                self._fired[key] = fire_at
                self._on_fire(run_id, timer_id)

    async def _loop(self) -> None:
        while True:
            now = self._clock.now()
            self._fire_due(now)
            if now >= self._next_refill:
                try:
                    await self._refill()
                except Exception:  # a failing store must not kill the timer loop
                    log.exception("timer refill failed; retrying in %.0fs", REFILL_RETRY_S)
                    await asyncio.sleep(REFILL_RETRY_S)  # back off instead of spinning on a broken store
                continue
            deadline = min(self._heap[0][0], self._next_refill) if self._heap else self._next_refill
            self._wake.clear()
            await self._clock.sleep_until(deadline, self._wake)
