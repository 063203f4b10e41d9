"""`baton publish`: an event on NATS JetStream as event triggers receive it."""

from __future__ import annotations

import asyncio

import nats
import orjson
from nats.js.api import StreamConfig
from typer.testing import CliRunner

from server.cli import app
from tests.serverproc import free_port

runner = CliRunner()


async def _make_stream(url: str) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().add_stream(StreamConfig(name="SHOP", subjects=["orders.>"]))
    finally:
        await nc.close()


async def _stored(url: str) -> list[tuple[dict, dict]]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info("SHOP")
        got = []
        for seq in range(1, info.state.last_seq + 1):
            msg = await js.get_msg("SHOP", seq)
            got.append((orjson.loads(msg.data), dict(msg.headers or {})))
        return got
    finally:
        await nc.close()


def test_publish_wraps_data_in_a_cloudevent_whose_id_dedupes(nats_server):
    asyncio.run(_make_stream(nats_server.url))
    args = ["publish", "orders.created", '{"order_id": "o-1", "amount": 5}', "--id", "evt-1",
            "--type", "com.example.order.created", "--nats-url", nats_server.url]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "published evt-1 on orders.created: stream SHOP, seq 1" in first.output
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "duplicate" in again.output

    raw = runner.invoke(app, ["publish", "orders.paid", '{"order_id": "o-1"}', "--raw", "--nats-url", nats_server.url])
    assert raw.exit_code == 0, raw.output

    (event, headers), (body, _) = asyncio.run(_stored(nats_server.url))
    assert headers["Nats-Msg-Id"] == "evt-1"
    assert {k: event[k] for k in ("specversion", "id", "source", "type", "data")} == {
        "specversion": "1.0", "id": "evt-1", "source": "baton-cli", "type": "com.example.order.created",
        "data": {"order_id": "o-1", "amount": 5}}
    assert body == {"order_id": "o-1"}


def test_a_subject_no_stream_captures_is_an_error_that_says_so(nats_server):
    done = runner.invoke(app, ["publish", "nowhere.at.all", "{}", "--nats-url", nats_server.url])
    assert done.exit_code == 1
    assert "no JetStream stream captures 'nowhere.at.all'" in done.output


def test_bad_json_and_an_absent_broker_are_named():
    bad = runner.invoke(app, ["publish", "orders.created", "{not json"])
    assert bad.exit_code == 2
    assert "not valid JSON" in bad.output
    url = f"nats://127.0.0.1:{free_port()}"
    absent = runner.invoke(app, ["publish", "orders.created", "{}", "--nats-url", url])
    assert absent.exit_code == 1
    assert f"cannot connect to NATS at {url}" in absent.output
