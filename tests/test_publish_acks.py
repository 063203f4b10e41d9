"""Bus.publish_many against a real nats-server: per message, did its stream keep it.

The outbox deletes exactly the rows whose messages a stream acknowledged, so these
answers decide what is published again after a failure."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from nats.js.api import StreamConfig



@pytest.fixture
async def stream(bus) -> AsyncIterator[str]:
    """A stream of its own for the test's subjects (`<prefix>.>`); the prefix is returned."""
    prefix = f"acks{uuid.uuid4().hex[:8]}"
    await bus.ensure_stream(StreamConfig(name=prefix.upper(), subjects=[f"{prefix}.>"], duplicate_window=60.0))
    yield prefix
    await bus.js.delete_stream(prefix.upper())


async def test_each_message_a_stream_keeps_is_acknowledged_and_stored(bus, stream):
    messages = [(f"{stream}.m{i}", f"body {i}".encode(), {"Nats-Msg-Id": f"id-{i}"}) for i in range(300)]

    assert await bus.publish_many(messages) == [True] * 300

    info = await bus.js.stream_info(stream.upper())
    assert info.state.messages == 300
    stored = await bus.js.get_msg(stream.upper(), seq=300)
    assert (stored.subject, stored.data) == (f"{stream}.m299", b"body 299")


async def test_a_message_no_stream_captures_is_not_acknowledged_and_does_not_stall_the_rest(bus, stream):
    messages = [
        (f"{stream}.a", b"1", {}),
        (f"nostream{uuid.uuid4().hex[:8]}.x", b"2", {}),  # no responders: a 503 status reply
        (f"{stream}.b", b"3", {}),
    ]

    assert await bus.publish_many(messages, timeout_s=5.0) == [True, False, True]


async def test_a_copy_inside_the_duplicate_window_counts_as_kept_once(bus, stream):
    first = await bus.publish_many([(f"{stream}.d", b"x", {"Nats-Msg-Id": "same"})])
    again = await bus.publish_many([(f"{stream}.d", b"x", {"Nats-Msg-Id": "same"})] * 3)

    # the stream answers a duplicate with an ack (`"duplicate": true`): the row may go
    assert first == [True] and again == [True, True, True]
    assert (await bus.js.stream_info(stream.upper())).state.messages == 1


async def test_consecutive_calls_do_not_see_each_others_replies(bus, stream):
    for round_ in range(5):
        batch = [(f"{stream}.r{round_}", str(i).encode(), {}) for i in range(50)]
        assert await bus.publish_many(batch) == [True] * 50
    assert (await bus.js.stream_info(stream.upper())).state.messages == 250


async def test_nothing_to_publish_answers_at_once(bus):
    assert await bus.publish_many([]) == []
