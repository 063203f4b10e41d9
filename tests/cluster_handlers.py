"""Handlers for the multi-replica tests: each invocation appends one line to a file that
every replica process shares, naming the replica that ran it (the file outlives a SIGKILL)."""

from __future__ import annotations

import asyncio
import os
import time

from handlers import handler


@handler("cluster.step")
async def step(ctx, path: str, work_ms: int = 0):
    replica = os.environ.get("BATON_CLUSTER__REPLICA", "?")
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{replica} {ctx.run_id} {ctx.step_id} {ctx.attempt}\n")
    await asyncio.sleep(work_ms / 1000)
    return {"step": ctx.step_id, "by": replica}


@handler("cluster.hold")
async def hold(ctx, path: str, hold_ms: int):
    """Hold for a while, writing when it began and ended: how many ran at once, across replicas."""
    replica = os.environ.get("BATON_CLUSTER__REPLICA", "?")
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"begin {replica} {ctx.run_id} {time.time()}\n")
    await asyncio.sleep(hold_ms / 1000)
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"end {replica} {ctx.run_id} {time.time()}\n")
    return {"by": replica}
