"""Handlers for the durable-timer tests (tests/test_durable_timers.py). Each call appends
one line to a file, so a test counts what ran across server processes (a file outlives
SIGKILL); the in-process tests load them too."""

from __future__ import annotations

import asyncio

from handlers import handler


def _append(path: str, line: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


@handler("timer.record")
async def record(ctx, path: str, label: str = ""):
    """One line per call: `<run_id> <step> <attempt> <label>`."""
    _append(path, f"{ctx.run_id} {ctx.step_id} {ctx.attempt} {label or '-'}")
    return {"label": label}


@handler("timer.hang_first")
async def hang_first(ctx, path: str):
    """Attempt 1 records itself and never returns (the step's timeout ends it); later attempts succeed."""
    _append(path, f"{ctx.run_id} {ctx.step_id} {ctx.attempt} -")
    if ctx.attempt == 1:
        await asyncio.Event().wait()
    return {"attempt": ctx.attempt}


@handler("timer.fail_first")
async def fail_first(ctx, path: str):
    """Attempt 1 fails (retryably); later attempts succeed."""
    _append(path, f"{ctx.run_id} {ctx.step_id} {ctx.attempt} -")
    if ctx.attempt == 1:
        raise RuntimeError("first attempt fails on purpose")
    return {"attempt": ctx.attempt}
