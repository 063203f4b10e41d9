"""Handlers the benchmarks load into the server, with `BATON_HANDLER_MODULES=["bench.bench_handlers"]`.

`bench.inflight` measures concurrency from inside the server: it counts the
invocations of itself in flight in the process and returns that count, itself
included, as it was when it started. The count only rises when an invocation
starts, so the largest value a run's outputs hold is the peak the run reached.
The server runs in-process handlers on one event loop, so a plain integer is a
safe counter.
"""

from __future__ import annotations

import asyncio

from handlers.context import Context
from handlers.registry import handler


class InFlight:
    count = 0


@handler("bench.inflight")
async def inflight(ctx: Context, delay_ms: float = 0.0) -> int:
    InFlight.count += 1
    seen = InFlight.count
    try:
        # sleep(0) still yields once, so other invocations may start meanwhile
        await asyncio.sleep(delay_ms / 1000)
    finally:
        InFlight.count -= 1
    return seen
