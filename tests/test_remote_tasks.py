"""Baton's side of remote task queues, in-process against a real nats-server; and the
wire format as a worker in another language would speak it (plain nats-py, JSON)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import orjson
import pytest
from nats.aio.client import Client
from nats.js.api import ConsumerConfig

from server.app import open_runtime
from server.bus.tasks import Result, decode_result, decode_task, encode_result
from server.engine.events import ErrorInfo
from server.errors import BadRequest
from server.settings import load_settings

QUEUED = """
name: queued
steps:
  - id: render
    task: gpu.render
    queue: gpu
    timeout: 1h
    input: {frame: "{{ input.frame }}"}
"""


@pytest.fixture
def make_settings(tmp_path, monkeypatch):
    wf = tmp_path / "wf"
    wf.mkdir()
    (wf / "queued.yaml").write_text(QUEUED)
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("{}\n")
    monkeypatch.setenv("BATON_CONFIG", str(cfg))

    def make(**overrides):
        return load_settings(data_dir=tmp_path / "data", workflows=[wf], limits={"shutdown_grace_s": 0.2}, **overrides)

    return make


@pytest.fixture
async def client(nats_server) -> AsyncIterator[Client]:
    nc = await nats.connect(nats_server.url)
    yield nc
    await nc.close()


async def eventually(predicate, what: str, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not await predicate():
            await asyncio.sleep(0.02)


async def test_a_worker_speaking_the_documented_json_completes_a_step(make_settings, nats_server, client):
    async with open_runtime(make_settings(nats_url=nats_server.url)) as rt:
        run, _ = await rt.start_run("queued", {"frame": 7})
        js = client.jetstream()
        sub = await js.pull_subscribe("baton.tasks.gpu", durable="worker-gpu", stream="BATON_TASKS",
                                      config=ConsumerConfig(ack_wait=10))
        [msg] = await sub.fetch(1, timeout=10)
        task = orjson.loads(msg.data)
        assert msg.headers["Nats-Msg-Id"] == task["task_id"] == task["idempotency_key"] == f"{run['run_id']}:render:1"
        assert msg.headers["traceparent"].startswith("00-")
        assert {k: task[k] for k in ("run_id", "workflow", "step_id", "key", "attempt", "queue", "handler", "input",
                                     "compensation", "timeout_s", "heartbeat_s")} == {
            "run_id": run["run_id"], "workflow": "queued", "step_id": "render", "key": "render", "attempt": 1,
            "queue": "gpu", "handler": "gpu.render", "input": {"frame": 7}, "compensation": False,
            "timeout_s": 3600.0, "heartbeat_s": 30.0}
        assert task["deadline"] > 0
        # garbage and results for unknown runs are dropped, and do not hold up the rest
        await js.publish("baton.results.gpu", b"not json")
        await js.publish("baton.results.gpu", orjson.dumps({"task_id": "nope:render:1", "run_id": "nope", "type": "heartbeat"}))
        for body in ({"task_id": task["task_id"], "run_id": task["run_id"], "type": "started", "worker": "raw"},
                     {"task_id": task["task_id"], "run_id": task["run_id"], "type": "heartbeat"},
                     {"task_id": task["task_id"], "run_id": task["run_id"], "type": "succeeded", "output": {"ok": 1}}):
            await js.publish("baton.results.gpu", orjson.dumps(body))
        await msg.ack()
        done = await rt.wait(run["run_id"], 10)
        assert done["status"] == "succeeded"
        assert (await rt.get_run(run["run_id"]))["output"] == {"ok": 1}
        await eventually(lambda: _pending(js, "BATON_RESULTS", 0), "every result to be acked or dropped")
        await sub.unsubscribe()


async def test_cancelling_a_run_withdraws_the_task_no_worker_took(make_settings, nats_server, client):
    cancels: list[bytes] = []

    async def on_cancel(msg) -> None:
        cancels.append(msg.data)

    await client.subscribe("baton.cancel.gpu", cb=on_cancel)
    async with open_runtime(make_settings(nats_url=nats_server.url)) as rt:
        run, _ = await rt.start_run("queued", {"frame": 1})
        js = client.jetstream()
        await eventually(lambda: _pending(js, "BATON_TASKS", 1), "the task to be queued")
        await rt.cancel(run["run_id"])
        if rt.cluster is None:  # replicas do not know where another's outbox put it: workers skip it instead
            await eventually(lambda: _pending(js, "BATON_TASKS", 0), "the task to be deleted from its queue")
        await eventually(_true_when(lambda: cancels), "the cancel notice")
        assert orjson.loads(cancels[0]) == {"task_id": f"{run['run_id']}:render:1"}


async def test_without_nats_a_queue_step_fails_at_once(make_settings):
    async with open_runtime(make_settings(nats={"enabled": False})) as rt:
        run, _ = await rt.start_run("queued", {"frame": 1})
        assert (await rt.wait(run["run_id"], 10))["status"] == "failed"
        error = (await rt.get_run(run["run_id"]))["error"]
        assert error["type"] == "QueueUnavailable" and error["retryable"] is False


def test_results_are_checked_before_they_reach_the_engine():
    ok = Result("r1:a:1", "r1", "failed", "w1", error=ErrorInfo("Boom", "x", False, {"k": 1}))
    assert decode_result(encode_result(ok)) == ok
    assert ok.msg_id == "r1:a:1:failed" and Result("r1:a:1", "r1", "heartbeat").msg_id is None
    for body, field in (({"task_id": "r2:a:1", "run_id": "r1", "type": "started"}, "task_id"),
                        ({"task_id": "r1:a:1", "run_id": "r1", "type": "done"}, "type"),
                        ({"task_id": "r1:a:1", "run_id": "r1", "type": "failed"}, "error"),
                        ({"task_id": "r1:a:1", "run_id": "r1", "type": "failed", "error": {"type": "X"}}, "message")):
        with pytest.raises(BadRequest) as info:
            decode_result(orjson.dumps(body))
        assert info.value.field == field
    with pytest.raises(BadRequest):
        decode_task(b'{"task_id": "r1:a:1"}')


async def _pending(js, stream: str, count: int) -> bool:
    return (await js.stream_info(stream)).state.messages == count


def _true_when(fn):
    async def check() -> bool:
        return bool(fn())

    return check
