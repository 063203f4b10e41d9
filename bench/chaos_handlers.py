"""Handlers of the `chaos` crash loop (bench/chaos.py), loaded into the server and into
its `baton worker` with `bench.chaos_handlers`.

Every invocation appends one JSON line to the file named by `CHAOS_HANDLER_LOG`
*before* doing anything else: run, step, attempt, idempotency key, kind (`invoke` or
`compensate`), wall time and pid. The line goes out with one `os.write` on a file
opened with O_APPEND, so it is in the kernel before the handler can be killed, and
lines of the server and of the worker never interleave. The crash loop counts
these lines against what the store recorded.
"""

from __future__ import annotations

import asyncio
import os
import time

import orjson

from handlers import NonRetryableError, handler
from handlers.context import Context

LOG_ENV = "CHAOS_HANDLER_LOG"


def record(ctx: Context, kind: str) -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    line = orjson.dumps({
        "run": ctx.run_id, "step": ctx.step_id, "attempt": ctx.attempt, "key": ctx.idempotency_key,
        "kind": kind, "t": time.time(), "pid": os.getpid(),
    }) + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


async def _work(work_ms: float) -> None:
    # a few milliseconds of "work" keep attempts in flight, so kills land inside them
    if work_ms > 0:
        await asyncio.sleep(work_ms / 1000)


@handler("chaos.step")
async def step(ctx: Context, work_ms: float = 0.0) -> dict:
    record(ctx, "invoke")
    await _work(work_ms)
    return {"key": ctx.idempotency_key}


@handler("chaos.saga")
async def saga(ctx: Context, fail_at: str = "", flaky: bool = False, work_ms: float = 0.0) -> dict:
    """Fails for good at the step named `fail_at` (so the run compensates); with `flaky`,
    every step's first attempt fails with a retryable error."""
    record(ctx, "invoke")
    await _work(work_ms)
    if ctx.step_id == fail_at:
        raise NonRetryableError(f"chaos: {fail_at} fails", type="ChaosDeclined")
    if flaky and ctx.attempt == 1:
        raise RuntimeError("chaos: first attempt fails")
    return {"key": ctx.idempotency_key}


@handler("chaos.undo")
async def undo(ctx: Context, work_ms: float = 0.0) -> dict:
    record(ctx, "compensate")
    await _work(work_ms)
    return {"undone": ctx.step_id}
