"""Handlers served by `baton worker` processes in tests/test_workers.py (the server
under test does not load them: queue steps run only in workers)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from handlers import NonRetryableError, handler

RELEASE_WAIT_S = 30.0  # bounds a handler that waits for its test to let it finish


@handler("remote.echo")
async def echo(ctx, text: str):
    return {"text": text.upper(), "pid": os.getpid(), "task_id": ctx.task_id, "step": ctx.step_id}


@handler("remote.decline")
async def decline(ctx, reason: str):
    raise NonRetryableError(reason, type="Declined", details={"reason": reason})


@handler("remote.stuck_first")
async def stuck_first(ctx, log: str, release: str):
    """Attempt 1 never returns (its worker is killed); later attempts wait for `release`."""
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"{os.getpid()} {ctx.attempt} {ctx.task_id}\n")
    if ctx.attempt == 1:
        await asyncio.Event().wait()
    for _ in range(int(RELEASE_WAIT_S / 0.05)):
        if Path(release).exists():
            return {"pid": os.getpid(), "attempt": ctx.attempt}
        await asyncio.sleep(0.05)
    raise NonRetryableError("the test never released this attempt")


@handler("remote.until_released")
async def until_released(ctx, log: str, release: str):
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"{os.getpid()} {ctx.attempt} {ctx.task_id}\n")
    for _ in range(int(RELEASE_WAIT_S / 0.05)):
        if Path(release).exists():
            return {"pid": os.getpid(), "attempt": ctx.attempt}
        await asyncio.sleep(0.05)
    raise NonRetryableError("the test never released this attempt")
