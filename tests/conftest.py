"""Shared fixtures: a real nats-server with JetStream on a free loopback port."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator

import nats
import pytest
from hypothesis import settings as hypothesis_settings

from server.bus.connection import Bus
from server.bus.embedded import EmbeddedNats
from server.store.sqlite import SQLiteStore

# Property and fuzz tests that leave `max_examples` to the profile: CI runs a bounded
# number per target (the suite's time), `HYPOTHESIS_PROFILE=thorough` thousands, locally.
hypothesis_settings.register_profile("ci", max_examples=60)
hypothesis_settings.register_profile("thorough", max_examples=3000)
hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


class ExternalNats:
    """BATON_TEST_NATS_URL: a server the tests do not own (it cannot be restarted)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def restart(self) -> None:
        pytest.skip("needs an embedded nats-server to restart (BATON_TEST_NATS_URL is set)")

    def stop(self) -> None:
        pytest.skip("needs an embedded nats-server to stop (BATON_TEST_NATS_URL is set)")


async def _forget_baton_streams(url: str) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for name in await js.streams_info():
            if name.config.name.startswith("BATON_"):
                await js.delete_stream(name.config.name)
    finally:
        await nc.close()


@pytest.fixture
def nats_server(tmp_path) -> Iterator[EmbeddedNats | ExternalNats]:
    """A nats-server of this test's own (its streams start empty), or BATON_TEST_NATS_URL."""
    if url := os.environ.get("BATON_TEST_NATS_URL"):
        asyncio.run(_forget_baton_streams(url))  # each test starts from empty streams, as with its own server
        yield ExternalNats(url)
        return
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def bus(nats_server) -> AsyncIterator[Bus]:
    """Baton's own NATS connection to the test's nats-server."""
    bus = Bus([nats_server.url])
    await bus.connect()
    yield bus
    await bus.close()


@pytest.fixture(autouse=True)
def _embedded_nats_on_a_free_port(monkeypatch):
    """A server a test starts without a NATS URL embeds nats-server: on a free port,
    not on 4222, so tests never meet a developer's own NATS (or each other)."""
    monkeypatch.setenv("BATON_NATS__EMBEDDED_PORT", "-1")


@pytest.fixture
async def store(tmp_path):
    """A fresh SQLite store in the test's directory, open for the test."""
    s = SQLiteStore(tmp_path / "baton.db")
    await s.open()
    yield s
    await s.close()
