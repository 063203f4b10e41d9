"""The examples' end-to-end tests (`pytest -m examples`): each runs one workflow from
config/workflows with its handlers from handlers/, against a real nats-server, the real
server in a subprocess, moto in server mode and stand-in HTTP services on loopback."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.examples.support import MotoServer


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.examples)
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def moto_server(tmp_path) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path / "moto.log").start()
    try:
        yield server
    finally:
        server.stop()
