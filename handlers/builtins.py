"""Built-in handlers, registered on `import handlers`: small tools for wiring and demos."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from handlers.context import Context, NonRetryableError
from handlers.registry import handler


class HandlerFailed(Exception):
    """A retryable failure raised on purpose by the `fail` handler."""


@handler("noop")
async def noop(ctx: Context) -> None:
    return None


@handler("echo")
async def echo(ctx: Context, **input: Any) -> dict[str, Any]:
    return input


@handler("fail")
async def fail(
    ctx: Context,
    message: str = "failed on purpose",
    times: int | None = None,
    retryable: bool = True,
    error_type: str | None = None,
) -> dict[str, int]:
    """Fail attempts 1..`times` (every attempt if None), then succeed."""
    if times is not None and ctx.attempt > times:
        return {"attempt": ctx.attempt}
    if not retryable:
        raise NonRetryableError(message, type=error_type)
    raise _failure_class(error_type)(message)


@functools.cache
def _failure_class(error_type: str | None) -> type[HandlerFailed]:
    # The reported error type is the class name, so a custom type is a subclass named
    # after it; `except HandlerFailed` still catches it.
    if error_type is None:
        return HandlerFailed
    return type(error_type, (HandlerFailed,), {"__module__": __name__})


@handler("sleep")
async def sleep(ctx: Context, seconds: float) -> dict[str, float]:
    await asyncio.sleep(seconds)
    return {"slept": seconds}
