"""Time as an input: the runtime reads time and jitter only through a Clock."""

from __future__ import annotations

import random
import time
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
