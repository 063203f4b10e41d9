"""The NATS connection: nats-py with reconnect, JetStream, and error mapping.

nats-py reconnects by itself (every `reconnect_wait_s`, forever); while it is
away, core publishes wait in its pending buffer and JetStream requests time
out. Callers see only `BusError`: the nats-py exceptions are mapped here, once.

Shutdown order matters (see the field notes on pull subscriptions): the
subscriptions are unsubscribed first, then the connection is drained, so a
pull subscription that had a fetch time out cannot hold the drain for its
whole timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import nats
import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck, StreamConfig

from server.errors import BusError
from server.settings import Nats as NatsSettings

log = logging.getLogger("baton.nats")

DRAIN_TIMEOUT_S = 5.0
PUBLISH_TIMEOUT_S = 5.0  # a JetStream publish waits this long for the stream's ack
DRAIN_WAIT_S = 0.05  # pull(): how long the second fetch may wait for what the first said was there


async def settle(action: Callable[..., Awaitable[Any]], *args: Any) -> None:
    """Ack, nak or term a JetStream message. If the connection is away, the message is
    delivered again after its ack wait, and whoever consumes it dedupes the copy."""
    try:
        await action(*args)
    except Exception as exc:
        log.debug("cannot settle a message: %s", exc or type(exc).__name__)


async def pull(sub: Any, batch: int, wait_s: float) -> list[Any]:
    """Up to `batch` messages from a pull subscription, returned as soon as there is one;
    raises asyncio.TimeoutError if none came within `wait_s`.

    Not nats-py's `fetch(batch, timeout=wait_s)`: once its long poll has a message, it
    waits for the rest of the batch until the timeout, holding what came meanwhile
    unacknowledged. Messages trickling in were held for the whole `wait_s`, past the
    consumer's ack wait, and delivered again to another consumer while this one still
    processed them. So: one message, long-polled; then at most as many as the server
    said were pending behind it, which are there now (another consumer may take some:
    that fetch waits DRAIN_WAIT_S at most).
    """
    msgs = list(await sub.fetch(1, timeout=wait_s))
    pending = _pending(msgs[-1]) if msgs else 0
    if batch > 1 and pending:
        try:
            msgs += await sub.fetch(min(batch - 1, pending), timeout=DRAIN_WAIT_S)
        except asyncio.TimeoutError:  # another consumer took them
            pass
    return msgs


def _pending(msg: Any) -> int:
    """How many messages the consumer had left to deliver after `msg` (0 if unknown)."""
    try:
        return msg.metadata.num_pending or 0
    except Exception:  # not a JetStream message (no metadata in its reply subject)
        return 0


async def flush_all(nc: Client) -> None:
    """Return once the server has processed everything `nc` sent so far (e.g. a SUB,
    so a message sent next is not missed or answered "no responders").

    One flush() is not enough with nats-py 2.16: it writes its PING straight to the
    socket, ahead of commands still queued for the client's flusher task (a SUB just
    sent), so the PONG can come back before the server has them (a few starts in a
    hundred). The flusher runs while the first PING is in flight, so the second PING
    follows them.
    """
    await nc.flush()
    await nc.flush()


@contextmanager
def mapped(what: str) -> Iterator[None]:
    """nats-py and asyncio timeouts become BusError naming what was attempted."""
    try:
        yield
    except BusError:
        raise
    except nats.js.errors.APIError as exc:
        raise BusError(f"{what}: JetStream refused: {exc.description or exc} (code {exc.err_code})") from exc
    except (nats.errors.Error, asyncio.TimeoutError, OSError) as exc:
        raise BusError(f"{what}: {type(exc).__name__}: {exc or 'timed out'}") from exc


def _tls_context(settings: NatsSettings) -> ssl.SSLContext | None:
    tls = settings.tls
    if tls is None:
        return None
    ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
    if tls.cert_file:
        ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    return ctx


class _AckBatch:
    """The replies one publish_many call waits for: message i's is `<prefix>.<first + i>`."""

    __slots__ = ("prefix", "first", "answers", "left", "done")

    def __init__(self, prefix: str, first: int, count: int) -> None:
        self.prefix, self.first = prefix, first
        self.answers: list[bool | None] = [None] * count  # None: no reply yet
        self.left = count
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def acked(self) -> list[bool]:
        return [answer is True for answer in self.answers]

    def reply_to(self, i: int) -> str:
        return f"{self.prefix}.{self.first + i}"


class _Acks:
    """JetStream publish acknowledgements for one connection, on one wildcard inbox."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._next = 0
        self._open: dict[int, _AckBatch] = {}  # by the first reply number of each batch

    def open(self, count: int) -> _AckBatch:
        batch = _AckBatch(self.prefix, self._next, count)
        self._next += count
        self._open[batch.first] = batch
        return batch

    def close(self, batch: _AckBatch) -> None:
        self._open.pop(batch.first, None)  # a reply arriving later finds no batch: dropped

    async def on_reply(self, msg: Any) -> None:
        try:
            number = int(msg.subject.rpartition(".")[2])
        except ValueError:
            return
        for first, batch in self._open.items():  # a handful at most: calls are sequential
            if first <= number < first + len(batch.answers):
                break
        else:
            return
        i = number - first
        if batch.answers[i] is not None:
            return
        # A stream's ack is `{"stream": ..., "seq": ...}`; a refusal is `{"error": ...}`,
        # and no stream for the subject is an empty 503 status message: neither counts.
        try:
            reply = orjson.loads(msg.data) if msg.data else None
        except orjson.JSONDecodeError:
            reply = None
        batch.answers[i] = isinstance(reply, dict) and "stream" in reply and "error" not in reply
        batch.left -= 1
        if batch.left == 0 and not batch.done.done():
            batch.done.set_result(None)


class Bus:
    """One NATS connection for the whole process, plus its JetStream context."""

    def __init__(self, servers: list[str], settings: NatsSettings | None = None, *, name: str = "baton") -> None:
        self.servers = servers
        self.settings = settings or NatsSettings()
        self.name = name
        self.nc: Client = Client()
        self.js: JetStreamContext = self.nc.jetstream(timeout=PUBLISH_TIMEOUT_S)
        self._subs: list[Any] = []
        self._closing = False
        self._acks: _Acks | None = None  # opened by the first publish_many

    @property
    def connected(self) -> bool:
        return self.nc.is_connected

    @property
    def state(self) -> str:
        if self.nc.is_connected:
            return "connected"
        if self.nc.is_reconnecting:
            return "reconnecting"
        if self.nc.is_closed:
            return "closed"
        return "disconnected"

    async def connect(self) -> None:
        s = self.settings
        options: dict[str, Any] = dict(
            servers=self.servers, name=self.name, connect_timeout=s.connect_timeout_s,
            # a server reconnects forever: giving up would leave Baton running without NATS
            reconnect_time_wait=s.reconnect_wait_s, max_reconnect_attempts=-1, allow_reconnect=True,
            ping_interval=s.ping_interval_s, max_outstanding_pings=s.max_outstanding_pings,
            drain_timeout=DRAIN_TIMEOUT_S, error_cb=self._on_error, disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected, closed_cb=self._on_closed,
            # a broker outage buffers up to this much of core publishes (signal replies, requests)
            pending_size=8 * 1024 * 1024,
        )
        if s.credentials:
            options["user_credentials"] = str(s.credentials)
        if s.token:
            options["token"] = s.token.get_secret_value()
        if (tls := _tls_context(s)) is not None:
            options["tls"] = tls
            if s.tls and s.tls.hostname:
                options["tls_hostname"] = s.tls.hostname
        where = ", ".join(self.servers)
        # nats-py retries a first connect as it reconnects (every reconnect_wait_s, without
        # end): a broker starting beside Baton is waited for, a broker that never comes is
        # an error that names it, for the supervisor to see, after startup_wait_s
        with mapped(f"cannot connect to NATS at {where}"):
            try:
                await asyncio.wait_for(self.nc.connect(**options), s.startup_wait_s)
            except asyncio.TimeoutError:
                raise BusError(f"cannot connect to NATS at {where}: not reachable within "
                               f"nats.startup_wait_s={s.startup_wait_s:g}s") from None
        log.info("connected to NATS at %s", self.nc.connected_url.netloc if self.nc.connected_url else where)

    def track(self, sub: Any) -> Any:
        """Remember a subscription so close() unsubscribes it before draining."""
        self._subs.append(sub)
        return sub

    async def close(self) -> None:
        if self.nc.is_closed:
            return
        self._closing = True
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:  # already gone, or the connection is down: nothing to release
                pass
        self._subs.clear()
        try:
            if self.nc.is_connected:
                await asyncio.wait_for(self.nc.drain(), DRAIN_TIMEOUT_S + 1)
        except (nats.errors.Error, asyncio.TimeoutError) as exc:
            log.warning("NATS drain did not finish cleanly: %s", exc or type(exc).__name__)
        finally:
            if not self.nc.is_closed:
                try:
                    await self.nc.close()
                except (nats.errors.Error, OSError) as exc:  # the broker went away meanwhile
                    log.warning("NATS close: %r", exc)

    # -- JetStream --

    async def ensure_stream(self, config: StreamConfig) -> None:
        """Create the stream, or bring an existing one's subjects and limits to `config`. Baton's
        own streams (those that leave `num_replicas` unset) get `nats.stream.replicas` copies,
        as the event stream does: on a NATS cluster, losing a node loses none of them."""
        if config.num_replicas is None:
            config = dataclasses.replace(config, num_replicas=self.settings.stream.replicas)
        with mapped(f"cannot set up stream {config.name}"):
            try:
                info = await self.js.stream_info(config.name)
            except nats.js.errors.NotFoundError:
                await self.js.add_stream(config)
                log.info("created stream %s for %s", config.name, ", ".join(config.subjects or []))
                return
            current = info.config
            if (sorted(current.subjects or []), current.max_age, current.max_bytes) != (
                sorted(config.subjects or []), config.max_age, config.max_bytes
            ):
                await self.js.update_stream(config)
                log.info("updated stream %s: %s", config.name, ", ".join(config.subjects or []))

    async def publish(self, subject: str, data: bytes, *, headers: dict[str, str] | None = None,
                      msg_id: str | None = None, timeout_s: float = PUBLISH_TIMEOUT_S) -> PubAck:
        """Publish into a stream and wait for its ack; `msg_id` dedupes within the stream's window."""
        if msg_id is not None:
            headers = {**(headers or {}), "Nats-Msg-Id": msg_id}
        with mapped(f"cannot publish to {subject}"):
            return await self.js.publish(subject, data, timeout=timeout_s, headers=headers)

    async def publish_many(self, messages: list[tuple[str, bytes, dict[str, str]]],
                           timeout_s: float = PUBLISH_TIMEOUT_S) -> list[bool]:
        """Publish into streams pipelined (one write each, acks awaited together).
        Returns, per message, whether its stream acknowledged it in time.

        Leaner than nats-py's `publish_async` per message (a random token, a future with
        callbacks, a semaphore and a parsed PubAck each): one reply subscription for the
        connection, replies numbered within the call, one future per call."""
        if not messages:
            return []
        if self._acks is None:
            acks = _Acks(self.nc.new_inbox())
            with mapped("cannot subscribe to publish acknowledgements"):
                self.track(await self.nc.subscribe(f"{acks.prefix}.*", cb=acks.on_reply))
            self._acks = acks  # only once subscribed: a failed attempt is made again next call
        batch = self._acks.open(len(messages))
        try:
            with mapped(f"cannot publish {len(messages)} messages"):
                for i, (subject, data, headers) in enumerate(messages):
                    await self.nc.publish(subject, data, reply=batch.reply_to(i), headers=headers)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(batch.done), timeout_s)
            return batch.acked
        finally:
            self._acks.close(batch)

    # -- connection events (nats-py callbacks) --

    async def _on_error(self, exc: Exception) -> None:
        if not self._closing:
            log.warning("NATS: %s", exc or type(exc).__name__)

    async def _on_disconnected(self) -> None:
        if not self._closing:
            log.warning("NATS disconnected; reconnecting every %.1fs", self.settings.reconnect_wait_s)

    async def _on_reconnected(self) -> None:
        log.info("NATS reconnected to %s", self.nc.connected_url.netloc if self.nc.connected_url else "?")

    async def _on_closed(self) -> None:
        if not self._closing:
            log.error("NATS connection closed")
