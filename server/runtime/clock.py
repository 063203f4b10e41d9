"""Time as an input: the runtime reads time and jitter only through a Clock."""

from __future__ import annotations

import random
import time
from datetime import datetime, timezone
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Unix seconds."""

    def jitter(self) -> float:
        """A number in [0, 1) for retry jitter."""


class SystemClock:
    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed)

    def now(self) -> float:
        return time.time()

    def jitter(self) -> float:
        return self._random.random()


def iso(ts: float | None) -> str | None:
    """Unix seconds as RFC 3339 in UTC with milliseconds (`2026-01-01T12:00:00.000Z`): every view's timestamps."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
