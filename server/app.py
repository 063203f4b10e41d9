"""Wiring: the only module that names concrete adapters (SQLite store, NATS, aiohttp site)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from aiohttp import web

import handlers
from server.bus.connection import Bus
from server.bus.embedded import EmbeddedNats
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
async def open_bus(settings: Settings) -> AsyncIterator[Bus | None]:
    """The NATS connection: to `nats_url`, or to an embedded nats-server when none is set."""
    if not settings.nats.enabled:
        yield None
        return
    async with AsyncExitStack() as stack:
        servers = settings.nats_servers
        if not servers:
            embedded = EmbeddedNats(settings.nats_embedded_dir)
            servers = [await asyncio.to_thread(embedded.start)]
            stack.callback(embedded.stop)
        bus = Bus(servers, settings.nats)
        await bus.connect()
        stack.push_async_callback(bus.close)
        yield bus


@asynccontextmanager
async def open_runtime(settings: Settings, clock: Clock | None = None) -> AsyncIterator[Runtime]:
    """Store, NATS and runtime, started in dependency order and stopped in reverse.

    Whatever feeds the runtime from NATS (event triggers, signals, worker results)
    starts after the runtime and stops before it; what the runtime feeds (remote
    queues, the lifecycle outbox) is ready before recovery dispatches anything.
    """
    catalog = load_catalog(settings)
    settings.db_path.parent.mkdir(parents=True, exist_ok=True)
    async with AsyncExitStack() as stack:
        store = SQLiteStore(settings.db_path, synchronous=settings.sqlite_sync)
        await store.open()
        stack.push_async_callback(store.close)
        bus = await stack.enter_async_context(open_bus(settings))
        stack.push_async_callback(handlers.REGISTRY.aclose)
        runtime = Runtime(store, catalog, handlers.REGISTRY, settings.limits, clock)
        if bus is not None:
            runtime.nats_state = lambda: bus.state
        stack.push_async_callback(runtime.stop, settings.limits.shutdown_grace_s)
        await runtime.start()
        yield runtime


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
