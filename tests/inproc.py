"""The real runtime and API in the test's own event loop, served on a loopback port."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from server.api.app import build_api
from server.api.routes import ORCH
from server.app import open_runtime
from server.runtime.clock import Clock
from server.settings import Settings


def runtime_of(client: TestClient):
    """The runtime behind an `api_client`."""
    return client.server.app[ORCH]


@asynccontextmanager
async def api_client(settings: Settings, clock: Clock | None = None) -> AsyncIterator[TestClient]:
    async with open_runtime(settings, clock) as runtime:
        async with TestClient(TestServer(build_api(runtime, settings), host="127.0.0.1")) as client:
            yield client


async def call(client: TestClient, method: str, path: str, expect: int = 200, **kwargs: Any) -> Any:
    """One request; the status must be `expect`. Returns the JSON body."""
    response = await client.request(method, path, **kwargs)
    body = await response.json()
    assert response.status == expect, body
    return body


async def eventually(predicate: Callable[[], Awaitable[Any]], what: str, timeout_s: float = 10.0) -> Any:
    """Poll an async predicate until it returns something truthy (returned); fail naming
    `what` after `timeout_s`. The wait is for a condition, never a fixed time."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(0.005)
