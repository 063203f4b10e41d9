"""Event triggers against a real nats-server: CloudEvents in, runs out, exactly once;
dead letters; lifecycle events out through the outbox, across a broker restart."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
import orjson
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from server.app import open_runtime
from server.settings import load_settings
from server.triggers.events import event_run_id

pytestmark = pytest.mark.integration

ORDERS = """
name: on-order
input_schema:
  type: object
  required: [order_id, total]
  properties: {order_id: {type: string}, total: {type: number}}
triggers:
  - event:
      subject: "shop.orders.*"
      filter: "event.data.total > 0"
      input: {order_id: "{{ event.data.order_id }}", total: "{{ event.data.total }}", source: "{{ event.source }}"}
steps:
  - id: record
    task: echo
    input: {order: "{{ input.order_id }}", source: "{{ input.source }}", type: "{{ event.type }}"}
"""

AUDIT = """
name: audit
triggers:
  - event: {subject: "shop.orders.created"}
steps:
  - id: note
    task: echo
    input: {data: "{{ input }}"}
"""


def cloudevent(id_: str, data, *, source: str = "/shop", type_: str = "shop.order.created") -> bytes:
    return orjson.dumps({"specversion": "1.0", "id": id_, "source": source, "type": type_, "data": data})


async def until(cond: Callable[[], Awaitable[bool]], timeout_s: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not await cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def settings_for(tmp_path: Path, url: str, *workflows: str, **overrides):
    wf_dir = tmp_path / "workflows"
    wf_dir.mkdir(exist_ok=True)
    for i, text in enumerate(workflows):
        (wf_dir / f"wf{i}.yaml").write_text(text)
    return load_settings(data_dir=tmp_path / "data", workflows=[wf_dir], nats_url=url,
                         limits={"shutdown_grace_s": 2}, **overrides)


async def all_runs(rt, workflow: str | None = None) -> list[dict]:
    runs, cursor = await rt.list_runs(workflow=workflow, limit=500)
    while cursor:
        more, cursor = await rt.list_runs(workflow=workflow, limit=500, cursor=cursor)
        runs += more
    return runs


async def succeeded(rt, workflow: str, n: int) -> bool:
    runs = await all_runs(rt, workflow)
    return len(runs) >= n and all(r["status"] == "succeeded" for r in runs)


async def test_cloudevent_starts_run_with_templated_input_and_filter(tmp_path, nats_server):
    async with open_runtime(settings_for(tmp_path, nats_server.url, ORDERS)) as rt:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await js.publish("shop.orders.created", cloudevent("e1", {"order_id": "A1", "total": 5}))
        await js.publish("shop.orders.created", cloudevent("e2", {"order_id": "A2", "total": 0}))  # filter false
        await js.publish("shop.orders.paid", cloudevent("e3", {"order_id": "A3", "total": 7}))
        await until(lambda: succeeded(rt, "on-order", 2), what="two runs")
        runs = await all_runs(rt, "on-order")
        by_order = {}
        for r in runs:
            detail = await rt.get_run(r["run_id"])
            by_order[detail["input"]["order_id"]] = detail
        assert sorted(by_order) == ["A1", "A3"]
        assert by_order["A1"]["input"] == {"order_id": "A1", "total": 5, "source": "/shop"}
        assert by_order["A1"]["steps"][0]["output"] == {"order": "A1", "source": "/shop", "type": "shop.order.created"}
        # the filtered event is recorded as matching nothing, and acknowledged
        await until(lambda: _event_recorded(rt, "ce:/shop:e2"), what="the filtered event's record")
        assert (await rt.store.get_event("ce:/shop:e2")).outcome == "unmatched"
        assert (await rt.store.get_event("ce:/shop:e1")).outcome == "started"
        await nc.close()


async def _event_recorded(rt, key: str) -> bool:
    return await rt.store.get_event(key) is not None


async def test_binary_and_plain_json_events(tmp_path, nats_server):
    async with open_runtime(settings_for(tmp_path, nats_server.url, ORDERS)) as rt:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        headers = {"ce-specversion": "1.0", "ce-id": "b1", "ce-source": "/pos", "ce-type": "pos.sale",
                   "content-type": "application/json"}
        await js.publish("shop.orders.created", orjson.dumps({"order_id": "B1", "total": 3}), headers=headers)
        await js.publish("shop.orders.created", orjson.dumps({"order_id": "P1", "total": 4}),
                         headers={"Nats-Msg-Id": "plain-1"})
        await until(lambda: succeeded(rt, "on-order", 2), what="two runs")
        inputs = {(await rt.get_run(r["run_id"]))["input"]["order_id"]: (await rt.get_run(r["run_id"]))
                  for r in await all_runs(rt, "on-order")}
        assert inputs["B1"]["input"]["source"] == "/pos"
        assert inputs["B1"]["steps"][0]["output"]["type"] == "pos.sale"
        assert inputs["P1"]["input"]["source"] == "nats"  # plain JSON: the body is event.data
        await nc.close()


async def test_same_message_id_and_same_cloudevent_id_start_one_run(tmp_path, nats_server):
    async with open_runtime(settings_for(tmp_path, nats_server.url, ORDERS)) as rt:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        first = await js.publish("shop.orders.created", cloudevent("d1", {"order_id": "D1", "total": 1}),
                                 headers={"Nats-Msg-Id": "m-1"})
        again = await js.publish("shop.orders.created", cloudevent("d1", {"order_id": "D1", "total": 1}),
                                 headers={"Nats-Msg-Id": "m-1"})
        assert again.duplicate and again.seq == first.seq  # JetStream's own window
        # the same CloudEvent republished without a message id: Baton's own record dedupes it
        await js.publish("shop.orders.created", cloudevent("d2", {"order_id": "D2", "total": 1}))
        await until(lambda: _event_recorded(rt, "ce:/shop:d2"), what="d2 recorded")
        await js.publish("shop.orders.created", cloudevent("d2", {"order_id": "D2", "total": 1}))
        await js.publish("shop.orders.created", cloudevent("d3", {"order_id": "D3", "total": 1}))
        await until(lambda: _event_recorded(rt, "ce:/shop:d3"), what="d3 recorded")
        await until(lambda: succeeded(rt, "on-order", 3), what="three runs")
        orders = sorted([(await rt.get_run(r["run_id"]))["input"]["order_id"] for r in await all_runs(rt, "on-order")])
        assert orders == ["D1", "D2", "D3"]
        assert rt.triggers.stats["duplicates"] == 1
        await nc.close()


async def test_redelivery_after_a_crash_between_commit_and_record_starts_nothing_new(tmp_path, nats_server):
    """The crash window: the run was committed, the event record and ack were not."""
    async with open_runtime(settings_for(tmp_path, nats_server.url, ORDERS)) as rt:
        key = "ce:/shop:c1"
        run_id = event_run_id(key, "on-order", 0)
        run, created = await rt.start_run("on-order", {"order_id": "C1", "total": 2}, run_id=run_id)
        assert created
        nc = await nats.connect(nats_server.url)
        await nc.jetstream().publish("shop.orders.created", cloudevent("c1", {"order_id": "C1", "total": 2}))
        await until(lambda: _event_recorded(rt, key), what="the event record")
        record = await rt.store.get_event(key)
        assert orjson.loads(record.runs) == [{"workflow": "on-order", "run_id": run_id, "created": False}]
        assert len(await all_runs(rt, "on-order")) == 1
        await nc.close()


async def test_one_event_starts_every_matching_workflow(tmp_path, nats_server):
    async with open_runtime(settings_for(tmp_path, nats_server.url, ORDERS, AUDIT)) as rt:
        nc = await nats.connect(nats_server.url)
        await nc.jetstream().publish("shop.orders.created", cloudevent("x1", {"order_id": "X1", "total": 9}))
        await until(lambda: _event_recorded(rt, "ce:/shop:x1"), what="the event record")
        runs = orjson.loads((await rt.store.get_event("ce:/shop:x1")).runs)
        assert sorted(r["workflow"] for r in runs) == ["audit", "on-order"]
        assert all(r["created"] for r in runs)
        await nc.close()


async def test_events_published_while_baton_is_down_all_start_once(tmp_path, nats_server):
    settings = settings_for(tmp_path, nats_server.url, AUDIT)
    async with open_runtime(settings):
        pass  # creates the stream and the durable consumer, as a first deploy does
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    acks = await asyncio.gather(*(js.publish("shop.orders.created", cloudevent(f"n{i}", {"n": i})) for i in range(200)))
    assert len({a.seq for a in acks}) == 200
    async with open_runtime(settings) as rt:
        await until(lambda: succeeded(rt, "audit", 200), timeout_s=60, what="200 runs")
        runs = await all_runs(rt, "audit")
        ns = sorted([(await rt.get_run(r["run_id"]))["input"]["n"] for r in runs])
        assert ns == list(range(200))  # none lost, none doubled
    await nc.close()


async def test_bad_event_is_dead_lettered_and_the_consumer_keeps_going(tmp_path, nats_server):
    # lifecycle events off: dead letters still go out, on their own
    async with open_runtime(settings_for(tmp_path, nats_server.url, ORDERS, nats={"lifecycle_events": False})) as rt:
        nc = await nats.connect(nats_server.url)
        dlq = await nc.subscribe("baton.dlq.>")
        js = nc.jetstream()
        # order_id is a number: the input fails the workflow's schema
        await js.publish("shop.orders.created", cloudevent("bad1", {"order_id": 41, "total": 3}),
                         headers={"X-Origin": "test"})
        await js.publish("shop.orders.created", b"not json at all", headers={"Nats-Msg-Id": "garbage-1"})
        await js.publish("shop.orders.created", cloudevent("good1", {"order_id": "G1", "total": 1}))
        first = await dlq.next_msg(timeout=10)
        second = await dlq.next_msg(timeout=10)
        by_key = {m.headers.get("Baton-Workflow", "none"): m for m in (first, second)}
        schema = by_key["on-order"]
        assert schema.subject == "baton.dlq.shop.orders.created"
        assert "input.order_id" in schema.headers["Baton-Error"]
        assert schema.headers["X-Origin"] == "test"  # original headers kept
        assert orjson.loads(schema.data)["id"] == "bad1"  # the original body
        assert "not JSON" in by_key["none"].headers["Baton-Error"]
        await until(lambda: succeeded(rt, "on-order", 1), what="the good event's run")
        letters, _ = await rt.list_dead_letters()
        assert sorted(d["event_key"] or "" for d in letters) == ["", "ce:/shop:bad1"]
        # replaying against the same definition fails again, and says why
        bad = next(d for d in letters if d["event_key"] == "ce:/shop:bad1")
        with pytest.raises(Exception, match="input.order_id"):
            await rt.replay_dead_letter(bad["id"])
        await nc.close()


async def test_dead_letter_replay_after_the_definition_is_fixed(tmp_path, nats_server):
    strict = ORDERS
    lenient = ORDERS.replace("order_id: {type: string}", "order_id: {}")
    settings = settings_for(tmp_path, nats_server.url, strict)
    async with open_runtime(settings) as rt:
        nc = await nats.connect(nats_server.url)
        await nc.jetstream().publish("shop.orders.created", cloudevent("r1", {"order_id": 9, "total": 9}))
        await until(lambda: _event_recorded(rt, "ce:/shop:r1"), what="the dead letter")
        (letter,), _ = await rt.list_dead_letters()
    (tmp_path / "workflows" / "wf0.yaml").write_text(lenient)
    async with open_runtime(settings) as rt:
        result = await rt.replay_dead_letter(letter["id"])
        (run,) = result["runs"]
        assert (await rt.wait(run["run_id"], 10))["status"] == "succeeded"
        (after,), _ = await rt.list_dead_letters()
        assert after["replay_run"] == run["run_id"]
        with pytest.raises(Exception, match="already replayed"):
            await rt.replay_dead_letter(letter["id"])
    await nc.close()


SLOW = """
name: slow
steps:
  - {id: nap, sleep: 0.3s}
  - {id: done, task: echo, input: {ok: true}}
"""


async def test_lifecycle_events_survive_a_nats_restart(tmp_path, nats_server):
    settings = settings_for(tmp_path, nats_server.url, SLOW, AUDIT)
    async with open_runtime(settings) as rt:
        started = [(await rt.start_run("slow", {}))[0]["run_id"] for _ in range(20)]
        nats_server.stop()
        if rt.cluster is None:  # runs finish while the broker is away; their events wait in the outbox
            for run_id in started:
                assert (await rt.wait(run_id, 10))["status"] == "succeeded"
        await until(lambda: _down(rt), timeout_s=10, what="readiness to report NATS")
        nats_server.start()
        await until(lambda: _ready(rt), timeout_s=20, what="NATS reconnect")
        for run_id in started:  # replicas run every step through JetStream: theirs go on now
            assert (await rt.wait(run_id, 20))["status"] == "succeeded"
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        # triggers work again after the reconnect
        await js.publish("shop.orders.created", cloudevent("after", {"x": 1}))
        await until(lambda: succeeded(rt, "audit", 1), timeout_s=20, what="a run from an event after restart")
        sub = await js.pull_subscribe("baton.run.slow.succeeded", durable=None, stream="BATON_LIFECYCLE",
                                      config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
        seen: dict[str, dict] = {}

        async def all_published() -> bool:
            try:
                for m in await sub.fetch(50, timeout=0.5):
                    event = orjson.loads(m.data)
                    seen[event["id"]] = event
                    assert m.headers["traceparent"].startswith("00-")
            except asyncio.TimeoutError:
                pass
            return len(seen) >= 20

        await until(all_published, timeout_s=20, what="20 run.succeeded events")
        assert sorted(e["data"]["run_id"] for e in seen.values()) == sorted(started)
        assert all(e["type"] == "baton.run.succeeded" and e["source"] == "baton" for e in seen.values())
        await sub.unsubscribe()
        await nc.close()


async def _ready(rt) -> bool:
    return rt.ready


async def _down(rt) -> bool:
    return not rt.ready


def test_a_crash_while_events_arrive_loses_none_and_doubles_none(tmp_path, nats_server):
    """SIGKILL the server while it consumes: unacknowledged events come back after the
    restart, and the ones whose runs were committed do not start a second run."""
    from tests.serverproc import ServerProcess

    wf_dir = tmp_path / "workflows"
    wf_dir.mkdir()
    (wf_dir / "audit.yaml").write_text(AUDIT)
    server = ServerProcess(tmp_path / "data", wf_dir, BATON_NATS_URL=nats_server.url)
    server.start()
    total = 300

    async def publish() -> None:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        await asyncio.gather(*(js.publish("shop.orders.created", cloudevent(f"k{i}", {"n": i})) for i in range(total)))
        await nc.close()

    def count(status: str | None = None) -> int:
        query = "&status=" + status if status else ""
        return len(server.request("GET", f"/v1/runs?workflow=audit&limit=500{query}")[1]["runs"])

    try:
        asyncio.run(publish())
        server.wait_for(lambda: count() >= 20, "some runs before the crash")
        server.kill()
        server.start()
        server.wait_for(lambda: count("succeeded") >= total, f"{total} runs after the restart", timeout_s=60)
        runs = server.request("GET", "/v1/runs?workflow=audit&limit=500")[1]["runs"]
        inputs = sorted(server.request("GET", f"/v1/runs/{r['run_id']}")[1]["input"]["n"] for r in runs)
        assert inputs == list(range(total))  # none lost, none doubled
    finally:
        server.stop()
