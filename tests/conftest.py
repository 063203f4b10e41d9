"""Shared fixtures: a real nats-server with JetStream on a free loopback port."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from server.bus.embedded import EmbeddedNats


class ExternalNats:
    """BATON_TEST_NATS_URL: a server the tests do not own (it cannot be restarted)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def restart(self) -> None:
        pytest.skip("needs an embedded nats-server to restart (BATON_TEST_NATS_URL is set)")

    def stop(self) -> None:
        pytest.skip("needs an embedded nats-server to stop (BATON_TEST_NATS_URL is set)")


@pytest.fixture
def nats_server(tmp_path) -> Iterator[EmbeddedNats | ExternalNats]:
    """A nats-server of this test's own (its streams start empty), or BATON_TEST_NATS_URL."""
    if url := os.environ.get("BATON_TEST_NATS_URL"):
        yield ExternalNats(url)
        return
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()
