"""Time as an input: the runtime reads time, waits for it and draws jitter only through a Clock.

Durable time is unix seconds (`now()`), because deadlines are stored and must mean
the same after a restart. Waiting for such a deadline goes through `sleep_until`,
so a test can swap in `ManualClock` and move time by hand: a one-day sleep then
fires the moment the test advances the clock by a day, and not before (trio's
MockClock is the model).

Both clocks wait with `asyncio.timeout`, never `asyncio.wait_for`: on Python 3.11
the latter can swallow a cancel that races with the awaited event, while a
Timeout tells its own expiry from a cancel aimed at the task.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from datetime import datetime, timezone
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Unix seconds."""

    def jitter(self) -> float:
        """A number in [0, 1) for retry jitter."""

    async def sleep_until(self, deadline: float, wake: asyncio.Event) -> None:
        """Return once this clock reads >= deadline (unix seconds) or `wake` is set,
        whichever comes first; never clears `wake`."""


class SystemClock:
    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed)

    def now(self) -> float:
        return time.time()

    def jitter(self) -> float:
        return self._random.random()

    async def sleep_until(self, deadline: float, wake: asyncio.Event) -> None:
        # The wait runs on the loop's monotonic clock. A step of the wall clock during
        # it is seen when the caller reads now() again; callers re-check and sleep on.
        delay_s = deadline - self.now()
        if wake.is_set() or delay_s <= 0:
            await asyncio.sleep(0)  # still a checkpoint: a caller looping on a past deadline cannot starve the loop
            return
        try:
            async with asyncio.timeout(delay_s):
                await wake.wait()
        except TimeoutError:
            pass


class _Sleeper:
    __slots__ = ("deadline", "timeout")

    def __init__(self, deadline: float, timeout: asyncio.Timeout) -> None:
        self.deadline, self.timeout = deadline, timeout


class ManualClock:
    """A clock for tests that moves only when told to.

    `now()` reads its own time; `advance(seconds)` and `set(t)` move it forward
    (never back: ValueError) and wake every `sleep_until` whose deadline has come.
    `jitter()` returns `jitter` if given, else a random number seeded by `seed`.
    Call `advance`/`set` from the event loop the sleepers run on.

    A sleeper is an `asyncio.timeout` that never expires by itself; moving the
    clock past its deadline expires it at once. A cancelled sleeper leaves no task,
    future or entry behind.
    """

    def __init__(self, start: float, *, jitter: float | None = None, seed: int = 0) -> None:
        if jitter is not None and not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter!r}")
        self._now = float(start)
        self._jitter = jitter
        self._random = random.Random(seed)
        self._sleepers: dict[int, _Sleeper] = {}
        self._ids = itertools.count()

    def now(self) -> float:
        return self._now

    def jitter(self) -> float:
        return self._jitter if self._jitter is not None else self._random.random()

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock only moves forward; cannot advance by {seconds!r}s")
        self.set(self._now + seconds)

    def set(self, t: float) -> None:
        if t < self._now:
            raise ValueError(f"a clock only moves forward; cannot set it from {self._now!r} back to {t!r}")
        self._now = float(t)
        due = [sid for sid, s in self._sleepers.items() if s.deadline <= self._now]
        if due:
            loop_now = asyncio.get_running_loop().time()
            for sid in due:
                # popped here, not when the sleeper resumes: a second move before then
                # must not touch a Timeout that is already expiring
                self._sleepers.pop(sid).timeout.reschedule(loop_now)

    @property
    def sleepers(self) -> list[float]:
        """The deadlines of the pending `sleep_until` calls, earliest first."""
        return sorted(s.deadline for s in self._sleepers.values())

    async def sleep_until(self, deadline: float, wake: asyncio.Event) -> None:
        if wake.is_set() or deadline <= self._now:
            await asyncio.sleep(0)  # a checkpoint, as SystemClock's
            return
        sid = next(self._ids)
        try:
            async with asyncio.timeout(None) as timeout:
                self._sleepers[sid] = _Sleeper(deadline, timeout)
                try:
                    await wake.wait()
                finally:
                    self._sleepers.pop(sid, None)
        except TimeoutError:
            pass


def iso(ts: float | None) -> str | None:
    """Unix seconds as RFC 3339 in UTC with milliseconds (`2026-01-01T12:00:00.000Z`): every view's timestamps."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
