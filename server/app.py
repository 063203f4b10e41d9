"""Wiring: the only module that names concrete adapters (the store, NATS, aiohttp site)."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

from aiohttp import web

import handlers
from handlers import nats as nats_handlers
from server.bus.approvals import APPROVALS_STREAM, WebhookNotifier
from server.bus.connection import Bus
from server.bus.embedded import EmbeddedNats
from server.bus.outbox import OutboxPublisher
from server.bus.remote import RemoteTasks
from server.bus.signals import SignalListener
from server.definitions.catalog import Catalog
from server.cluster import Cluster, SoleNode
from server.errors import BusError, DefinitionError
from server.runtime.approvals import ApprovalLinks, load_secret
from server.runtime.clock import Clock
from server.runtime.runner import Runtime
from server.settings import Settings
from server.store import make_store
from server.telemetry import logs
from server.telemetry.tracing import RunSpans, make_exporter, make_provider, tracing_enabled
from server.triggers.events import EventTriggers
from server.triggers.scheduler import Scheduler, compile_schedules
from server.triggers.webhooks import Webhooks

log = logging.getLogger("baton")


def import_handler_modules(modules: list[str]) -> None:
    """Import handler modules (ImportError names the module)."""
    # a user's handler package sits in the project directory, as it would for `python -m`
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    handlers.load_modules(modules)


def configure_logging(settings: Settings, *, dev: bool = False) -> None:
    """Every logger to stderr: JSON lines for `serve` and `worker` (a log pipeline reads
    them), readable lines for `dev`; secrets the settings hold are masked from here on."""
    logs.setup(settings.log_level, settings.log_format or ("console" if dev else "json"))
    logs.register_secrets(*(s.get_secret_value() for s in (settings.token, settings.nats.token, settings.approvals.secret)
                            if s is not None))


def load_catalog(settings: Settings) -> Catalog:
    """Import the handler modules, then load and check every workflow file against them."""
    import_handler_modules(settings.handler_modules)
    catalog, problems = Catalog.from_paths(settings.workflows, known_handlers=set(handlers.REGISTRY.names()))
    if problems:
        raise DefinitionError(problems)
    return catalog


def _start_embedded(settings: Settings) -> EmbeddedNats:
    embedded = EmbeddedNats(settings.nats_embedded_dir, port=settings.nats.embedded_port)
    try:
        embedded.start()
    except BusError as exc:
        if settings.nats.embedded_port == -1:
            raise
        log.warning("embedded nats-server cannot use port %d (%s); picking a free port",
                    settings.nats.embedded_port, exc.message.splitlines()[-1][-200:])
        embedded = EmbeddedNats(settings.nats_embedded_dir)
        embedded.start()
    log.info("embedded NATS with JetStream at %s (store %s)", embedded.url, embedded.store_dir)
    return embedded


@asynccontextmanager
async def open_bus(settings: Settings) -> AsyncIterator[Bus | None]:
    """The NATS connection: to `nats_url`, or to an embedded nats-server when none is set."""
    if not settings.nats.enabled:
        yield None
        return
    async with AsyncExitStack() as stack:
        servers = settings.nats_servers
        if not servers:
            embedded = await asyncio.to_thread(_start_embedded, settings)
            stack.callback(embedded.stop)
            servers = [embedded.url]
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
    schedules = compile_schedules(catalog, settings)  # unknown calendars fail here, before anything starts
    if not settings.db_is_postgres:
        settings.db_path.parent.mkdir(parents=True, exist_ok=True)
    async with AsyncExitStack() as stack:
        store = make_store(settings)
        await store.open()
        stack.push_async_callback(store.close)
        bus = await stack.enter_async_context(open_bus(settings))
        if bus is not None:  # before start(): recovery may run nats.* steps
            nats_handlers.use(bus.nc)
            stack.callback(nats_handlers.use, None)
        stack.push_async_callback(handlers.REGISTRY.aclose)
        runtime = Runtime(store, catalog, handlers.REGISTRY, settings.limits, clock)
        cluster = None
        if settings.db_is_postgres and bus is not None and settings.nats_servers:
            # replicas share the work through the NATS they all connect to: before start(), which it changes
            cluster = runtime.cluster = Cluster(settings.cluster, store, bus, runtime)
        elif settings.db_is_postgres:  # no NATS, or an embedded one of its own: alone, and sure of it
            sole = SoleNode(settings.cluster, store)
            await sole.start()
            stack.push_async_callback(sole.stop)
        store.on_group = runtime.metrics.store_group  # group commit latency and size
        approvals = settings.approvals
        configured = approvals.secret.get_secret_value() if approvals.secret is not None else None
        if configured or cluster is None:
            link_key = load_secret(configured, settings.data_dir)
        else:  # a link made by one replica is opened on any other: one key for all, in the database
            link_key = await store.shared_secret("approval_link_key", secrets.token_urlsafe(32))
        logs.register_secrets(link_key)  # it signs approval links: never in a log line
        runtime.approval_links = ApprovalLinks(link_key, settings.public_url or settings.url, approvals.link_ttl_s)
        if approvals.notify_url:  # told after each commit that opened requests: closes after the runtime stops
            notifier = WebhookNotifier(approvals.notify_url, approvals.notify_timeout_s)
            stack.push_async_callback(notifier.close)
            runtime.approval_requested = notifier.notify
        if bus is not None:
            runtime.nats_state = lambda: bus.state
            await bus.ensure_stream(APPROVALS_STREAM)  # before the outbox publishes rows of a previous run
            runtime.approval_events = True
            # publishes what the runtime and the triggers commit (lifecycle events, dead letters): stops after them
            # replicas commit rows of each other's: look for them every lease period
            outbox = OutboxPublisher(bus, store, rescan_s=settings.cluster.lease_s / 4 if cluster else None)
            await outbox.start()
            stack.push_async_callback(outbox.stop)
            runtime.lifecycle, runtime.outbox_written = settings.nats.lifecycle_events, outbox.wake
            # sends the queue steps the runtime dispatches (recovery too): closes after it stops
            remote = RemoteTasks(bus, runtime, runtime.clock,
                                 **({"ack_wait_s": settings.cluster.lease_s / 2} if cluster else {}))
            await remote.prepare()
            stack.push_async_callback(remote.close)
            runtime.remote = remote
        if tracing_enabled(settings.tracing.enabled):  # stops after the runtime: its last commits become spans
            provider, processor = make_provider(make_exporter())
            run_spans = RunSpans(provider, processor, store, runtime.graph_of, link_trigger=settings.tracing.trigger == "link")
            await run_spans.start()
            stack.push_async_callback(run_spans.stop)
            runtime.run_spans, runtime.tracer_provider = run_spans, provider
        stack.push_async_callback(runtime.stop, settings.limits.shutdown_grace_s)
        await runtime.start()
        # webhooks (POST /hooks/<path>, served by the API) read their secrets now, once
        runtime.webhooks = Webhooks(runtime, store, dedupe_window_s=settings.nats.dedupe_window_s)
        logs.register_secrets(*(hook.secret.decode() for hook in runtime.webhooks.hooks.values() if hook.secret))
        # cron and interval triggers feed the runtime: start after it, stop before it
        scheduler = Scheduler(runtime, store, schedules, settings, runtime.clock)
        if cluster is not None:  # the replica holding the time lease runs it
            cluster.scheduler = scheduler
        else:
            await scheduler.start()
            stack.push_async_callback(scheduler.stop)
        runtime.scheduler = scheduler
        if bus is not None:  # feeds the runtime: starts after it, stops before it
            triggers = EventTriggers(bus, runtime, store, settings.nats)
            runtime.triggers = triggers
            await triggers.start()
            stack.push_async_callback(triggers.stop)
        if bus is not None:  # feeds the runtime: starts after it, stops before it
            signals = SignalListener(bus, runtime, max_payload_bytes=settings.limits.max_body_bytes)
            await signals.start()
            stack.push_async_callback(signals.stop)
        if bus is not None:  # worker results feed the runtime: start after it, stop before it
            await remote.start()
            stack.push_async_callback(remote.stop)
        if cluster is not None:
            # this replica's worker on the shared queue of in-process steps: stops first, so
            # its last results are still taken
            from server.worker import Worker  # it imports this module

            worker = Worker(bus, [settings.cluster.queue], handlers.REGISTRY,
                            concurrency=settings.limits.max_concurrent_tasks, name=cluster.replica)
            await worker.start()
            stack.push_async_callback(worker.stop, settings.limits.shutdown_grace_s)
            await cluster.start()  # leads or follows: stops (and hands the lease over) before the rest
            stack.push_async_callback(cluster.stop)
        yield runtime


# Python's cyclic GC starts a young collection every 700 allocations by default, and an
# old one every 100 of those, scanning every live object: with a large run in memory (a
# 10k-item map) that was a fifth of the server's CPU. Baton's hot path makes few
# reference cycles, so collections are rarer, and start-up objects are frozen out of them.
GC_YOUNG_THRESHOLD = 50_000
GC_OLDER_THRESHOLDS = (20, 100)


def tune_gc() -> None:
    """Once start-up is done: freeze what it allocated (modules, settings, compiled
    workflows live as long as the process) and space collections out."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *GC_OLDER_THRESHOLDS)


async def serve(settings: Settings, *, dev: bool = False, clock: Clock | None = None) -> None:
    """The API and everything behind it, until SIGTERM or SIGINT. `clock` defaults to the
    system clock; the example tests pass one they move by hand, to drive schedules."""
    from server.api.app import build_api

    if dev and settings.auth.enabled:
        settings = settings.model_copy(update={"auth": settings.auth.model_copy(update={"enabled": False})})
    if not settings.auth.enabled:
        log.warning("API authentication is OFF: every caller has every role. Keep this port on loopback "
                    "(`baton serve` with auth.tokens turns it on)")

    async with open_runtime(settings, clock) as runtime:
        runner = web.AppRunner(build_api(runtime, settings), access_log=None, handle_signals=False)
        await runner.setup()
        tune_gc()
        site = web.TCPSite(runner, settings.host, settings.port)
        await site.start()
        port = runner.addresses[0][1] if runner.addresses else settings.port
        mode = "dev" if dev else "serve"
        log.info("Baton (%s) listening on http://%s:%d, database %s", mode, settings.host, port, settings.db_display)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down: no new requests; running steps get %.0fs to finish", settings.limits.shutdown_grace_s)
        await runner.cleanup()


def run_server(settings: Settings, *, dev: bool = False) -> None:
    configure_logging(settings, dev=dev)
    try:
        asyncio.run(serve(settings, dev=dev))
    except DefinitionError as exc:  # a workflow file or a schedule the config cannot serve: say which, not a traceback
        print("error: cannot start: the workflows have problems:\n  " + "\n  ".join(exc.problems), file=sys.stderr)
        raise SystemExit(1) from None
