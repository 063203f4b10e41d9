"""The outbox publisher against a real nats-server and a real SQLite store: every
committed row reaches its stream once, acknowledged rows are deleted (together,
within a bound), and a row its stream refuses neither gets lost nor holds up the
rows behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from nats.js.api import StreamConfig

from server.bus.outbox import DELETE_AFTER_S, LIFECYCLE_STREAM, OutboxPublisher
from server.store.base import Batch, OutboxRow
from tests.inproc import eventually


def rows(subject: str, count: int, start: int = 0) -> list[OutboxRow]:
    return [OutboxRow(None, subject, f"{subject}:{i}", b'{"Baton-Run-Id": "r"}', f'{{"n": {i}}}'.encode())
            for i in range(start, start + count)]


@pytest.fixture
async def outbox(bus, store) -> AsyncIterator[OutboxPublisher]:
    publisher = OutboxPublisher(bus, store)
    await publisher.start()
    yield publisher
    await publisher.stop()


async def stored(store) -> list[OutboxRow]:
    return await store.outbox_pending(10_000)


async def stream_count(bus, name: str) -> int:
    return (await bus.js.stream_info(name)).state.messages


async def test_committed_rows_are_published_once_and_then_deleted(bus, store, outbox):
    await store.commit(Batch(outbox=rows("baton.run.wf.started", 700)))
    outbox.wake()

    await eventually(lambda: _equals(stream_count(bus, LIFECYCLE_STREAM.name), 700), "700 messages in the stream")
    # deletes are coalesced, but never held longer than DELETE_AFTER_S after an ack
    await eventually(lambda: _empty(stored(store)), "the outbox rows deleted", timeout_s=DELETE_AFTER_S + 5)
    assert outbox.published == 700  # the cursor kept acknowledged rows from going out twice
    message = await bus.js.get_msg(LIFECYCLE_STREAM.name, seq=700)
    assert (message.subject, message.data) == ("baton.run.wf.started", b'{"n": 699}')
    assert message.headers["Nats-Msg-Id"] == "baton.run.wf.started:699"


async def test_a_refused_row_is_retried_without_holding_up_the_rows_after_it(bus, store, outbox):
    await store.commit(Batch(outbox=[*rows("baton.step.wf.a.succeeded", 3), *rows("nostream.x", 1),
                                     *rows("baton.step.wf.b.succeeded", 3)]))
    outbox.wake()
    await eventually(lambda: _equals(stream_count(bus, LIFECYCLE_STREAM.name), 6), "the six rows with a stream")
    await store.commit(Batch(outbox=rows("baton.run.wf.succeeded", 2)))
    outbox.wake()
    await eventually(lambda: _equals(stream_count(bus, LIFECYCLE_STREAM.name), 8), "rows committed after the refusal")
    await eventually(lambda: _subjects_are(stored(store), ["nostream.x"]), "only the refused row left in the store",
                     timeout_s=DELETE_AFTER_S + 5)

    await bus.ensure_stream(StreamConfig(name="NOSTREAM", subjects=["nostream.>"]))  # the operator fixes it

    await eventually(lambda: _equals(stream_count(bus, "NOSTREAM"), 1), "the refused row published on retry")
    await eventually(lambda: _empty(stored(store)), "every row deleted", timeout_s=DELETE_AFTER_S + 10)
    assert await stream_count(bus, LIFECYCLE_STREAM.name) == 8  # the retries republished nothing else


async def test_stop_deletes_what_was_acknowledged(bus, store):
    publisher = OutboxPublisher(bus, store)
    await publisher.start()
    await store.commit(Batch(outbox=rows("baton.run.wf.failed", 5)))
    publisher.wake()
    await eventually(lambda: _equals(stream_count(bus, LIFECYCLE_STREAM.name), 5), "5 messages in the stream")

    await publisher.stop()

    assert await stored(store) == []


async def _equals(value, expected) -> bool:
    return await value == expected


async def _empty(value) -> bool:
    return not await value


async def _subjects_are(value, expected: list[str]) -> bool:
    return [row.subject for row in await value] == expected
