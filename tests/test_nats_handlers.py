"""`nats.publish` and `nats.request` against a real nats-server: through workflows
run by the in-process runtime, and called directly for the finer points."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import StreamConfig

from handlers import REGISTRY, Context, NonRetryableError, invoke
from handlers import nats as nats_handlers
from handlers.context import idempotency_key
from handlers.http import header_injectors
from handlers.nats import NatsError, NatsRequestError
from server.app import open_runtime
from server.bus.connection import flush_all  # one flush() may overtake a SUB
from server.settings import load_settings

pytestmark = pytest.mark.integration

PUBLISHER = """
name: publisher
steps:
  - id: pub
    task: nats.publish
    input:
      subject: "{{ input.subject }}"
      data: {order: "{{ input.order }}"}
      headers: {X-Order: "{{ input.order }}"}
output: "{{ steps.pub.output }}"
"""

JS_PUBLISHER = """
name: js-publisher
steps:
  - id: pub
    task: nats.publish
    input: {subject: orders.created, data: "{{ input.data }}", jetstream: true, msg_id: "{{ input.msg_id }}"}
output: "{{ steps.pub.output }}"
"""

ASKER = """
name: asker
steps:
  - id: ask
    task: nats.request
    input: {subject: "{{ input.subject }}", data: {q: 1}, timeout_s: 0.2}
    retry: {max_attempts: 3, initial_delay: 0.01, jitter: 0}
output: "{{ steps.ask.output }}"
"""


def write_settings(tmp_path, monkeypatch, **overrides: Any):
    wf = tmp_path / "wf"
    wf.mkdir(exist_ok=True)
    (wf / "publisher.yaml").write_text(PUBLISHER)
    (wf / "js-publisher.yaml").write_text(JS_PUBLISHER)
    (wf / "asker.yaml").write_text(ASKER)
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("{}\n")
    monkeypatch.setenv("BATON_CONFIG", str(cfg))
    return load_settings(data_dir=tmp_path / "data", workflows=[wf], limits={"shutdown_grace_s": 0.2}, **overrides)


@pytest.fixture
def settings(tmp_path, monkeypatch, nats_server):
    return write_settings(tmp_path, monkeypatch, nats_url=nats_server.url)


@pytest.fixture
async def client(nats_server) -> AsyncIterator[Client]:
    nc = await nats.connect(nats_server.url)
    yield nc
    await nc.close()


@pytest.fixture
def bound(client) -> Iterator[Client]:
    """The handlers bound to the test's own connection, as the server binds its own."""
    nats_handlers.use(client)
    yield client
    nats_handlers.use(None)


@pytest.fixture
def traceparent() -> Iterator[str]:
    """A header injector like the one tracing installs."""
    value = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"

    def inject(ctx: Context, headers: dict[str, str]) -> None:
        headers["traceparent"] = value

    header_injectors.append(inject)
    yield value
    header_injectors.remove(inject)


@pytest.fixture
async def orders_stream(client) -> str:
    await client.jetstream().add_stream(StreamConfig(name="ORDERS", subjects=["orders.>"]))
    return "ORDERS"


def make_ctx(attempt: int = 1, step_id: str = "pub", compensation: bool = False) -> Context:
    return Context(workflow="wf", version="1", workflow_id=None, run_id="r1", step_id=step_id, task_id="t1",
                   attempt=attempt, idempotency_key=idempotency_key("r1", step_id, attempt), compensation=compensation)


async def call(name: str, input: Any, ctx: Context | None = None) -> Any:
    return await invoke(REGISTRY.get(name), ctx or make_ctx(), input, name=name)


async def responder(client: Client, subject: str) -> None:
    async def answer(msg: Msg) -> None:
        body = {"echo": json.loads(msg.data), "traceparent": (msg.headers or {}).get("traceparent")}
        await client.publish(msg.reply, json.dumps(body).encode(), headers={"X-Served-By": "test"})

    await client.subscribe(subject, cb=answer)
    await flush_all(client)


# --- through workflows -------------------------------------------------------------------


async def test_a_workflow_publishes_data_and_headers_to_a_subscriber(settings, client, traceparent):
    sub = await client.subscribe("orders.new")
    await flush_all(client)
    async with open_runtime(settings) as rt:
        run, _ = await rt.start_run("publisher", {"subject": "orders.new", "order": "A-7"})
        assert (await rt.wait(run["run_id"], 5))["status"] == "succeeded"
        assert (await rt.get_run(run["run_id"]))["output"] == {"subject": "orders.new"}
    msg = await sub.next_msg(timeout=5)
    assert json.loads(msg.data) == {"order": "A-7"}
    assert msg.headers == {"X-Order": "A-7", "traceparent": traceparent}
    # the server unbinds its connection when it stops
    with pytest.raises(NonRetryableError, match="NATS is not configured"):
        await call("nats.publish", {"subject": "orders.new"})


async def test_jetstream_publish_with_the_same_msg_id_stores_one_message(settings, client, orders_stream):
    async with open_runtime(settings) as rt:
        outputs = []
        for data in ("first", "second"):
            run, _ = await rt.start_run("js-publisher", {"data": data, "msg_id": "order-7"})
            assert (await rt.wait(run["run_id"], 5))["status"] == "succeeded"
            outputs.append((await rt.get_run(run["run_id"]))["output"])
    assert outputs == [
        {"subject": "orders.created", "stream": "ORDERS", "seq": 1, "duplicate": False},
        {"subject": "orders.created", "stream": "ORDERS", "seq": 1, "duplicate": True},
    ]
    info = await client.jetstream().stream_info(orders_stream)
    assert info.state.messages == 1
    stored = await client.jetstream().get_msg(orders_stream, 1)
    assert stored.data == b"first" and stored.headers["Nats-Msg-Id"] == "order-7"


async def test_a_workflow_request_returns_the_reply(settings, client, traceparent):
    await responder(client, "svc.echo")
    async with open_runtime(settings) as rt:
        run, _ = await rt.start_run("asker", {"subject": "svc.echo"})
        assert (await rt.wait(run["run_id"], 5))["status"] == "succeeded"
        output = (await rt.get_run(run["run_id"]))["output"]
    assert output == {"data": {"echo": {"q": 1}, "traceparent": traceparent}, "headers": {"X-Served-By": "test"}}


@pytest.mark.parametrize("listening", [False, True], ids=["no-responders", "timeout"])
async def test_a_request_without_a_reply_is_retried_then_fails_the_run(settings, client, listening):
    if listening:  # a subscriber that never answers: the request times out
        await client.subscribe("svc.silent")
        await flush_all(client)
    async with open_runtime(settings) as rt:
        run, _ = await rt.start_run("asker", {"subject": "svc.silent"})
        assert (await rt.wait(run["run_id"], 10))["status"] == "failed"
        step = (await rt.get_run(run["run_id"]))["steps"][0]
    assert step["attempt"] == 3
    assert step["error"]["type"] == "NatsRequestError" and step["error"]["retryable"] is True
    expected = "no reply within 0.2s" if listening else "no responders"
    assert expected in step["error"]["message"]


async def test_a_step_fails_at_once_when_nats_is_disabled(tmp_path, monkeypatch):
    settings = write_settings(tmp_path, monkeypatch, nats={"enabled": False})
    async with open_runtime(settings) as rt:
        run, _ = await rt.start_run("asker", {"subject": "svc.echo"})
        assert (await rt.wait(run["run_id"], 5))["status"] == "failed"
        step = (await rt.get_run(run["run_id"]))["steps"][0]
    assert step["attempt"] == 1
    assert step["error"]["type"] == "NatsError" and "NATS is not configured" in step["error"]["message"]


# --- called directly ---------------------------------------------------------------------


async def test_a_retried_attempt_publishes_to_jetstream_once(bound, orders_stream):
    first = await call("nats.publish", {"subject": "orders.paid", "data": {"n": 1}, "jetstream": True}, make_ctx(1))
    second = await call("nats.publish", {"subject": "orders.paid", "data": {"n": 1}, "jetstream": True}, make_ctx(2))
    assert (first["duplicate"], second["duplicate"]) == (False, True)
    assert first["seq"] == second["seq"]
    # the step's compensation is a different message
    undo = await call("nats.publish", {"subject": "orders.paid", "jetstream": True}, make_ctx(1, compensation=True))
    assert undo["duplicate"] is False
    stored = await bound.jetstream().get_msg(orders_stream, first["seq"])
    assert stored.headers["Nats-Msg-Id"] == "r1:pub"
    assert (await bound.jetstream().stream_info(orders_stream)).state.messages == 2


@pytest.mark.parametrize(("data", "wire"), [
    ("plain text", b"plain text"),
    (b"\x00raw", b"\x00raw"),
    (None, b""),
    ({"a": [1, "é"]}, '{"a":[1,"é"]}'.encode()),
    (42, b"42"),
])
async def test_data_encoding(bound, data, wire):
    sub = await bound.subscribe("enc.test")
    await bound.flush()
    assert await call("nats.publish", {"subject": "enc.test", "data": data}) == {"subject": "enc.test"}
    assert (await sub.next_msg(timeout=5)).data == wire
    await sub.unsubscribe()


async def test_a_reply_that_is_not_json_comes_back_as_text(bound):
    async def answer(msg: Msg) -> None:
        await msg.respond(b"pong, not json")

    await bound.subscribe("svc.text", cb=answer)
    out = await call("nats.request", {"subject": "svc.text", "data": "ping"})
    assert out == {"data": "pong, not json", "headers": {}}


async def test_jetstream_publish_to_a_subject_without_a_stream_is_retryable(bound):
    with pytest.raises(NatsError, match="no JetStream stream captures this subject"):
        await call("nats.publish", {"subject": "nowhere.x", "jetstream": True, "timeout_s": 1})


async def test_no_responders_raises_the_retryable_request_error(bound):
    with pytest.raises(NatsRequestError, match="no responders"):
        await call("nats.request", {"subject": "svc.none"})


@pytest.mark.parametrize(("input", "message"), [
    ({"subject": "a..b"}, "invalid subject 'a..b'"),
    ({"subject": "orders.*"}, "invalid subject 'orders.*'"),
    ({"subject": "orders.>"}, "invalid subject 'orders.>'"),
    ({"subject": "has space"}, "invalid subject 'has space'"),
    ({"subject": ""}, "invalid subject ''"),
    ({"subject": "ok", "headers": {"Bad:Name": "x"}}, "invalid header name 'Bad:Name'"),
    ({"subject": "ok", "headers": {"X-A": "one\r\ntwo"}}, "header 'X-A' must be a single line"),
    ({"subject": "ok", "headers": {"X-A": {"nested": 1}}}, "header 'X-A' must be a string or a number"),
    ({"subject": "ok", "headers": ["X-A"]}, "headers must be a mapping"),
    ({"subject": "ok", "data": {"x": float("nan")}}, "data cannot be sent as JSON"),
    ({"subject": "ok", "timeout_s": 0}, "timeout_s must be a positive number"),
    ({"subject": "ok", "jetstream": True, "msg_id": ""}, "msg_id must be a non-empty"),
    ({"subject": "ok", "jetstream": "yes"}, "jetstream must be true or false"),
])
async def test_bad_arguments_fail_without_retry_naming_the_problem(bound, input, message):
    with pytest.raises(NonRetryableError, match=re.escape(message)) as info:
        await call("nats.publish", input)
    assert info.value.type == "NatsError"


async def test_too_large_a_message_is_not_retried(bound):
    with pytest.raises(NonRetryableError, match="the server accepts at most"):
        await call("nats.publish", {"subject": "big", "data": "x" * (bound.max_payload + 1)})


async def test_without_a_connection_the_handlers_name_the_problem():
    nats_handlers.use(None)
    for name in ("nats.publish", "nats.request"):
        with pytest.raises(NonRetryableError, match="NATS is not configured") as info:
            await call(name, {"subject": "x"})
        assert info.value.type == "NatsError"
