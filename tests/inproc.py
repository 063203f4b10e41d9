"""The real runtime and API in the test's own event loop, served on a loopback port."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
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


def where(settings: Settings) -> Path | str:
    """The server's database: its SQLite file, or its PostgreSQL URL (BATON_TEST_DB=postgres)."""
    return settings.db if settings.db_is_postgres else settings.db_path


def sql(db: Path | str, statement: str, *args: Any) -> list[tuple]:
    """Run one statement (`?` placeholders) over a connection of our own, committed, and
    return its rows: what another process sees, or does behind the server's back. On
    PostgreSQL it runs in a thread, since the test's event loop may be running the server."""
    if isinstance(db, str):
        numbered = iter(range(1, statement.count("?") + 1))
        statement = re.sub(r"\?", lambda _: f"${next(numbered)}", statement)

        async def run() -> list[tuple]:
            conn = await asyncpg.connect(db)
            try:
                return [tuple(row) for row in await conn.fetch(statement, *args)]
            finally:
                await conn.close()

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, run()).result()
    con = sqlite3.connect(db)
    try:
        with con:
            return con.execute(statement, args).fetchall()
    finally:
        con.close()
