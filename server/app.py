"""Wiring: the only module that names concrete adapters (SQLite store, aiohttp site)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

import handlers
from server.definitions.catalog import Catalog
from server.errors import DefinitionError
from server.runtime.clock import Clock
from server.runtime.runner import Runtime
from server.settings import Settings
from server.store.sqlite import SQLiteStore

log = logging.getLogger("baton")


def import_handler_modules(settings: Settings) -> None:
    """Import the handler modules named in the settings (ImportError names the module)."""
    # a user's handler package sits in the project directory, as it would for `python -m`
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    handlers.load_modules(settings.handler_modules)


def load_catalog(settings: Settings) -> Catalog:
    """Import the handler modules, then load and check every workflow file against them."""
    import_handler_modules(settings)
    catalog, problems = Catalog.from_paths(settings.workflows, known_handlers=set(handlers.REGISTRY.names()))
    if problems:
        raise DefinitionError(problems)
    return catalog


@asynccontextmanager
async def open_runtime(settings: Settings, clock: Clock | None = None) -> AsyncIterator[Runtime]:
    catalog = load_catalog(settings)
    settings.db_path.parent.mkdir(parents=True, exist_ok=True)
    store = SQLiteStore(settings.db_path, synchronous=settings.sqlite_sync)
    await store.open()
    runtime = Runtime(store, catalog, handlers.REGISTRY, settings.limits, clock)
    try:
        await runtime.start()
        yield runtime
    finally:
        await runtime.stop(settings.limits.shutdown_grace_s)
        await store.close()
        await handlers.REGISTRY.aclose()


async def serve(settings: Settings, *, dev: bool = False) -> None:
    from server.api.app import build_api

    async with open_runtime(settings) as runtime:
        runner = web.AppRunner(build_api(runtime, settings), access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        port = runner.addresses[0][1] if runner.addresses else settings.port
        mode = "dev" if dev else "serve"
        log.info("Baton (%s) listening on http://%s:%d, database %s", mode, settings.host, port, settings.db_path)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down: no new requests; running steps get %.0fs to finish", settings.limits.shutdown_grace_s)
        await runner.cleanup()


def run_server(settings: Settings, *, dev: bool = False) -> None:
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(settings, dev=dev))
