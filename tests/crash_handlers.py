"""Handlers for crash tests: each invocation appends one line to a file, so a test can
count executions across server processes (the file outlives a SIGKILL)."""

from __future__ import annotations

from handlers import handler


@handler("test.count")
async def count(ctx, path: str, label: str = ""):
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{ctx.step_id} {ctx.attempt} {ctx.idempotency_key}\n")
    return {"step": ctx.step_id, "label": label}


@handler("test.hang")
async def hang(ctx, path: str):
    """Records the call, then never returns while BATON_TEST_HANG=1 (the process is killed)."""
    import asyncio
    import os

    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{ctx.step_id} {ctx.attempt} {ctx.idempotency_key}\n")
    if os.environ.get("BATON_TEST_HANG") == "1":
        await asyncio.Event().wait()
    return {"step": ctx.step_id}
