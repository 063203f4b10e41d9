"""The outbox publisher against a real nats-server and a real SQLite store: every
committed row reaches its stream once, acknowledged rows are deleted (together,
within a bound), and a row its stream refuses neither gets lost nor holds up the
rows behind it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest
from nats.js.api import StreamConfig

from server.bus.outbox import DELETE_AFTER_S, LIFECYCLE_STREAM, OutboxPublisher
from server.store.base import Batch, OutboxRow
from server.store.postgres import PostgresStore
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


async def test_a_row_committed_below_the_cursor_goes_out_when_its_transaction_commits(bus, postgres_url):
    """Replicas: ids are drawn at insert, so a transaction still open holds an id below rows
    another one committed first. Its commit wakes the publisher, which looks for the ids it
    passed, not only the periodic rescan (an hour here, so it cannot be what finds it)."""
    store = PostgresStore(postgres_url)
    await store.open()
    publisher = OutboxPublisher(bus, store, rescan_s=3600.0)
    await publisher.start()
    conn = await asyncpg.connect(postgres_url)
    try:
        late = conn.transaction()
        await late.start()
        await conn.execute("INSERT INTO outbox (subject, msg_id, headers, data) VALUES ($1, $2, $3, $4)",
                           "baton.run.wf.started", "late", b'{"Baton-Run-Id": "r"}', b'{"n": "late"}')
        await store.commit(Batch(outbox=rows("baton.run.wf.started", 2)))  # later ids, committed first
        publisher.wake()
        await eventually(lambda: _equals(stream_count(bus, LIFECYCLE_STREAM.name), 2), "the rows committed first")
        await late.commit()
        publisher.wake()
        await eventually(lambda: _equals(stream_count(bus, LIFECYCLE_STREAM.name), 3), "the row below the cursor")
        message = await bus.js.get_msg(LIFECYCLE_STREAM.name, seq=3)
        assert message.headers["Nats-Msg-Id"] == "late"
    finally:
        await conn.close()
        await publisher.stop()
        await store.close()


async def test_rows_are_read_by_id_in_id_order(store):
    await store.commit(Batch(outbox=rows("baton.run.wf.started", 5)))
    ids = [row.id for row in await stored(store)]
    got = await store.outbox_rows([ids[3], ids[0], 10**9, ids[1]])  # one id never stored
    assert [row.id for row in got] == [ids[0], ids[1], ids[3]]
    assert got[0].msg_id == "baton.run.wf.started:0"
    assert len(await store.outbox_rows(list(range(1, 2000)))) == 5  # more ids than SQLite takes in one statement
