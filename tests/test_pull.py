"""pull() against a real nats-server: messages come back as soon as there is one, and a
backlog in batches.

The results consumer and the event consumer pull with it. nats-py's own fetch(n, timeout)
held messages that trickled in until it had n or the timeout passed; on replicas sharing
the results consumer, results held past its ack wait were delivered to the other replica
as well, and both recorded them (seen as 5 s stalls and `task.ignored` in the replica
bench)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StreamConfig

from server.bus.connection import Bus, pull


STREAM_SUBJECT = "pull.m"


@pytest.fixture
async def stream(bus) -> AsyncIterator[str]:
    """A work-queue stream of the test's own; its name."""
    name = f"PULL{uuid.uuid4().hex[:8].upper()}"
    await bus.ensure_stream(StreamConfig(name=name, subjects=[STREAM_SUBJECT], retention=RetentionPolicy.WORK_QUEUE))
    yield name
    await bus.js.delete_stream(name)


async def subscribe(bus: Bus, stream: str, ack_wait_s: float = 30.0) -> Any:
    """A pull subscription on the stream's one durable consumer (each call: another
    subscriber sharing it, as replicas share the results consumer)."""
    config = ConsumerConfig(durable_name="c", ack_policy=AckPolicy.EXPLICIT, ack_wait=ack_wait_s)
    # tracked: unsubscribed before the bus drains (a timed-out fetch could hold the drain)
    return bus.track(await bus.js.pull_subscribe(STREAM_SUBJECT, durable="c", stream=stream, config=config))


async def outstanding(bus: Bus, stream: str) -> int:
    info = await bus.js.consumer_info(stream, "c")
    return (info.num_ack_pending or 0) + (info.num_pending or 0)


async def test_two_subscribers_of_a_busy_consumer_get_each_message_once(nats_server, bus, stream):
    # 3,000 messages at about 1,000/s, two subscribers with 5 s long polls and a 2 s ack
    # wait: with fetch(256, timeout=5) a subscriber held what trickled in until its batch
    # was full while the other competed for the rest, and hundreds were delivered twice
    others = [Bus([nats_server.url]) for _ in range(2)]
    for other in others:
        await other.connect()
    subs = [await subscribe(other, stream, ack_wait_s=2.0) for other in others]
    got: list[bytes] = []
    redelivered = 0

    async def consume(sub: Any) -> None:
        nonlocal redelivered
        while True:
            try:
                msgs = await pull(sub, 256, wait_s=5.0)
            except asyncio.TimeoutError:
                continue
            for msg in msgs:
                got.append(msg.data)
                redelivered += msg.metadata.num_delivered > 1
                await msg.ack()
            await asyncio.sleep(0.01)  # the batch's work (a group commit)

    consumers = [asyncio.create_task(consume(sub)) for sub in subs]
    try:
        for i in range(3000):
            await bus.publish(STREAM_SUBJECT, b"%d" % i)
            if i % 10 == 0:
                await asyncio.sleep(0.01)
        # every message got, and none left with the consumer (delivered and not acked, or
        # still to deliver): no copy can come after this
        async with asyncio.timeout(30):
            while len(set(got)) < 3000 or await outstanding(bus, stream):
                await asyncio.sleep(0.05)
    finally:
        for task in consumers:
            task.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)
        for other in others:
            await other.close()
    assert redelivered == 0
    assert sorted(got, key=int) == [b"%d" % i for i in range(3000)]


async def test_a_backlog_comes_back_in_batches_of_the_size_asked(bus, stream):
    sub = await subscribe(bus, stream)
    await bus.publish_many([(STREAM_SUBJECT, f"m{i}".encode(), {}) for i in range(300)])

    first = await pull(sub, 256, wait_s=5.0)
    for msg in first:
        await msg.ack()
    second = await pull(sub, 256, wait_s=5.0)

    assert [m.data for m in first + second] == [f"m{i}".encode() for i in range(300)]
    assert (len(first), len(second)) == (256, 44)


async def test_nothing_to_pull_is_a_timeout_after_the_long_poll(bus, stream):
    sub = await subscribe(bus, stream)
    with pytest.raises(asyncio.TimeoutError):
        await pull(sub, 256, wait_s=0.2)
