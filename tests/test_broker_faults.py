"""Broker faults against a real nats-server: killed, stalled, redelivering.

Each test drives NATS-triggered runs through the fault and then checks the same things:
* every event the stream acknowledged started exactly one run (none lost, none doubled);
* every run is terminal, and each step's result is recorded once in its history;
* every lifecycle event of every run reached the BATON_LIFECYCLE stream (deduped by
  CloudEvent id: after an outage longer than the stream's duplicate window a copy may
  be stored twice, and consumers dedupe by id), and the outbox is empty.

The faults: nats-server SIGKILLed and restarted on the same port and store while events
are published and runs publish lifecycle events; nats-server SIGSTOPped for longer than
the client's reconnect wait (a stalled broker keeps its sockets open: only unanswered
pings reveal it), then SIGCONTed; and a trigger delivered again because its first ack
was lost, or because the commit of its event record failed.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import nats.errors
import orjson
import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

import server.triggers.events as trigger_events
from server.errors import StoreError
from server.settings import load_settings
from server.triggers.events import event_run_id
from tests.inproc import api_client, runtime_of

pytestmark = pytest.mark.integration

SUBJECT = "faults.flow"
FLOW = f"""
name: flow
triggers:
  - event: {{subject: "{SUBJECT}"}}
steps:
  - id: a
    task: echo
    input: {{i: "{{{{ input.i }}}}"}}
  - id: b
    task: echo
    input: {{i: "{{{{ steps.a.output.i }}}}"}}
"""
TOTAL = 60  # events per test: enough to have some before, during and after the fault
# The client notices a stalled broker after max_outstanding_pings unanswered pings, one
# per interval: short here, so a stall of a few seconds is seen (the default is 10 s x 3).
NATS = {"reconnect_wait_s": 0.25, "ping_interval_s": 0.3, "max_outstanding_pings": 2}


def settings_for(tmp_path: Path, url: str):
    wf = tmp_path / "workflows"
    wf.mkdir(exist_ok=True)
    (wf / "flow.yaml").write_text(FLOW)
    return load_settings(data_dir=tmp_path / "data", workflows=[wf], nats_url=url, handler_modules=[],
                         auth={"enabled": False}, nats=NATS, limits={"shutdown_grace_s": 1})


async def until(cond: Callable[[], Awaitable[Any]], what: str, timeout_s: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := await cond()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(0.02)
    return value


async def publish_events(url: str, acked: list[int], total: int = TOTAL, deadline_s: float = 60.0) -> int:
    """Publish `total` events as a careful producer does: each is sent again (same
    Nats-Msg-Id) until the stream acknowledges it, through the broker's outages.
    Returns how many sends were not acknowledged (the fault as the producer saw it)."""
    nc = await nats.connect(url, reconnect_time_wait=0.1, max_reconnect_attempts=-1, ping_interval=1)
    js = nc.jetstream(timeout=1.0)
    deadline = time.monotonic() + deadline_s
    unacknowledged = 0
    try:
        for i in range(total):
            while True:
                try:
                    await js.publish(SUBJECT, orjson.dumps({"i": i}), headers={"Nats-Msg-Id": f"ev-{i}"})
                    break
                except (nats.errors.Error, asyncio.TimeoutError):
                    unacknowledged += 1
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.05)  # a retry pace, not a wait for a condition
            acked.append(i)
            await asyncio.sleep(0.01)  # spread the events over the fault
    finally:
        await nc.close()
    return unacknowledged


async def terminal_runs(rt) -> int:
    rows = [row async for page in rt.store.iter_runs(workflow="flow") for row in page]
    return sum(row.status == "succeeded" for row in rows)


async def check_exactly_once(rt, total: int = TOTAL) -> list[str]:
    """One run per acknowledged event, each terminal, each step's result recorded once.
    Returns the run ids."""
    rows = [row async for page in rt.store.iter_runs(workflow="flow") for row in page]
    by_input = Counter(orjson.loads(row.data)["input"]["i"] for row in rows)
    assert sorted(by_input) == list(range(total)), "an acknowledged event started no run"
    assert set(by_input.values()) == {1}, f"events that started two runs: {[i for i, n in by_input.items() if n > 1]}"
    assert {row.run_id for row in rows} == {event_run_id(f"msg:ev-{i}", "flow", 0) for i in range(total)}
    assert {row.status for row in rows} == {"succeeded"}
    run_ids = [row.run_id for row in rows]
    # a result delivered again (replicas take results from JetStream, at least once) is in
    # history too, with `task.ignored` right after it: it changed nothing
    rows = [row async for page in rt.store.iter_history(run_ids, types=("task.succeeded", "task.ignored"))
            for row in page]
    rows.sort(key=lambda row: (row.run_id, row.seq))
    results = Counter(
        (row.run_id, row.key) for row, after in zip(rows, [*rows[1:], None])
        if row.type == "task.succeeded" and not (
            after is not None and after.type == "task.ignored" and (after.run_id, after.seq) == (row.run_id, row.seq + 1)
            and orjson.loads(after.data)["task_id"] == orjson.loads(row.data)["task_id"]))
    assert results == Counter({(run_id, step): 1 for run_id in run_ids for step in ("a", "b")})
    return run_ids


async def check_lifecycle(rt, url: str, run_ids: list[str]) -> None:
    """Every run's lifecycle events are in the stream (by CloudEvent id) once the outbox is empty."""
    await until(lambda: _outbox_empty(rt), "the outbox to be published and emptied")
    expected = {f"{r}:started:1" for r in run_ids} | {f"{r}:succeeded:1" for r in run_ids} | {
        f"{r}:{step}:succeeded:1:1" for r in run_ids for step in ("a", "b")}
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe("baton.>", durable=None, stream="BATON_LIFECYCLE",
                                      config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
        seen: set[str] = set()

        async def all_seen() -> bool:
            try:
                for msg in await sub.fetch(200, timeout=0.5):
                    seen.add(orjson.loads(msg.data)["id"])
            except asyncio.TimeoutError:
                pass
            return seen >= expected

        try:
            await until(all_seen, f"{len(expected)} lifecycle events in the stream", timeout_s=20)
        finally:
            await sub.unsubscribe()
        assert seen == expected, f"unexpected lifecycle events: {sorted(seen - expected)[:5]}"
    finally:
        await nc.close()


async def _outbox_empty(rt) -> bool:
    return not await rt.store.outbox_pending(1)


async def test_nats_server_killed_and_restarted_under_load_loses_and_doubles_nothing(tmp_path, nats_server):
    async with api_client(settings_for(tmp_path, nats_server.url)) as client:
        rt = runtime_of(client)
        acked: list[int] = []
        publisher = asyncio.create_task(publish_events(nats_server.url, acked))
        try:
            await until(lambda: _at_least(terminal_runs(rt), 10), "runs to flow before the kill")
            assert len(acked) < TOTAL, "the events were all published before the fault"
            os.kill(nats_server.pid, signal.SIGKILL)  # no shutdown of its own: its JetStream store is as it was
            # down until Baton has noticed: runs go on meanwhile, their lifecycle events wait in the outbox
            response = await until(lambda: _not_ready(client), "/readyz to report the broker gone", timeout_s=15)
            assert re.search(r"nats (reconnecting|disconnected)$", (await response.json())["error"]["message"])
            await asyncio.to_thread(nats_server.restart)
            await until(lambda: _ready(client), "Baton to reconnect and be ready")
            await asyncio.wait_for(publisher, 60)  # its sends wait in nats-py's buffer through a short outage
            assert rt.triggers.bus.nc.stats["reconnects"] >= 1
        finally:
            publisher.cancel()
            await asyncio.gather(publisher, return_exceptions=True)
        await until(lambda: _at_least(terminal_runs(rt), TOTAL), f"{TOTAL} runs to finish")
        run_ids = await check_exactly_once(rt)
        await check_lifecycle(rt, nats_server.url, run_ids)


async def test_nats_server_stalled_past_the_reconnect_wait_is_reported_and_survived(tmp_path, nats_server):
    async with api_client(settings_for(tmp_path, nats_server.url)) as client:
        rt = runtime_of(client)
        acked: list[int] = []
        publisher = asyncio.create_task(publish_events(nats_server.url, acked))
        stalled = False
        try:
            await until(lambda: _at_least(terminal_runs(rt), 10), "runs to flow before the stall")
            assert len(acked) < TOTAL, "the events were all published before the fault"
            os.kill(nats_server.pid, signal.SIGSTOP)
            stalled = True
            # the sockets stay open: only the unanswered pings tell the client the broker is gone
            response = await until(lambda: _not_ready(client), "/readyz to report the stalled broker", timeout_s=15)
            body = await response.json()
            assert body["error"]["code"] == "not_ready"
            assert re.search(r"nats (reconnecting|disconnected)$", body["error"]["message"]), body
            # the fault lasts several reconnect waits: reconnects to the stopped process fail too
            await asyncio.sleep(4 * NATS["reconnect_wait_s"])
            assert not rt.ready
            os.kill(nats_server.pid, signal.SIGCONT)
            stalled = False
            await until(lambda: _ready(client), "Baton to be ready after the stall")
            assert await asyncio.wait_for(publisher, 60) > 0  # the producer met the stall
            assert rt.triggers.bus.nc.stats["reconnects"] >= 1
        finally:
            if stalled:
                os.kill(nats_server.pid, signal.SIGCONT)
            publisher.cancel()
            await asyncio.gather(publisher, return_exceptions=True)
        await until(lambda: _at_least(terminal_runs(rt), TOTAL), f"{TOTAL} runs to finish")
        run_ids = await check_exactly_once(rt)
        await check_lifecycle(rt, nats_server.url, run_ids)


@pytest.mark.parametrize("lost", ["the ack", "the event record"])
async def test_an_event_delivered_again_starts_one_run(tmp_path, nats_server, monkeypatch, lost):
    """A delivery whose run was committed but whose ack never reached the broker (or whose
    event record failed to commit) comes back: the second delivery starts nothing new."""
    monkeypatch.setattr(trigger_events, "ACK_WAIT_S", 0.5)  # redelivered after 0.5 s, not 10 s
    monkeypatch.setattr(trigger_events, "RETRY_DELAY_S", 0.05)
    async with api_client(settings_for(tmp_path, nats_server.url)) as client:
        rt = runtime_of(client)
        triggers = rt.triggers
        deliveries: list[int] = []
        process, commit = triggers._process, triggers._commit

        async def first_ack_lost(msg: Any) -> None:
            deliveries.append(msg.metadata.num_delivered)
            if msg.metadata.num_delivered == 1:
                async def vanish() -> None:  # sent into a connection that dropped
                    pass
                msg.ack = vanish
            await process(msg)

        async def first_record_fails(batch: Any) -> None:
            if batch.events and len(deliveries) == 0:
                deliveries.append(1)
                raise StoreError("the disk is full: injected by the test")
            await commit(batch)

        if lost == "the ack":
            monkeypatch.setattr(triggers, "_process", first_ack_lost)
        else:
            monkeypatch.setattr(triggers, "_commit", first_record_fails)
        acked: list[int] = []
        await publish_events(nats_server.url, acked, total=1)
        await until(lambda: _at_least(terminal_runs(rt), 1), "the run to finish")
        await until(lambda: _redelivered(rt, triggers), "the event to be delivered again and settled")
        (run,) = [row async for page in rt.store.iter_runs(workflow="flow") for row in page]
        assert run.run_id == event_run_id("msg:ev-0", "flow", 0)
        record = await rt.store.get_event("msg:ev-0")
        assert orjson.loads(record.runs) == [{"workflow": "flow", "run_id": run.run_id,
                                             "created": lost == "the ack"}]
        assert (await triggers.consumer_lag()) == (0, 0)  # acknowledged at last: it will not come again
        await check_exactly_once(rt, total=1)
        await check_lifecycle(rt, nats_server.url, [run.run_id])


async def _redelivered(rt, triggers) -> bool:
    return triggers.stats["received"] >= 2 and await triggers.consumer_lag() == (0, 0)


async def _at_least(count: Awaitable[int], n: int) -> bool:
    return await count >= n


async def _ready(client) -> bool:
    return (await client.get("/readyz")).status == 200


async def _not_ready(client) -> Any:
    response = await client.get("/readyz")
    return response if response.status == 503 else None


async def test_a_broker_that_comes_up_after_baton_is_waited_for_at_start_up(tmp_path):
    """A compose stack starts both at once: Baton's first connect keeps trying for
    nats.startup_wait_s instead of exiting on the first refusal."""
    from server.bus.connection import Bus
    from server.bus.embedded import EmbeddedNats
    from server.settings import Nats as NatsSettings
    from tests.serverproc import free_port

    port = free_port()
    bus = Bus([f"nats://127.0.0.1:{port}"], NatsSettings(reconnect_wait_s=0.1, startup_wait_s=30))
    connecting = asyncio.create_task(bus.connect())
    await asyncio.sleep(0.3)  # a few refused attempts: the length of the outage, not a synchronisation
    assert not connecting.done()
    broker = EmbeddedNats(tmp_path / "late-nats", port=port)
    await asyncio.to_thread(broker.start)
    try:
        await asyncio.wait_for(connecting, 30)
        assert bus.state == "connected"
        await bus.nc.publish("anything", b"x")  # the new client is the one in use
        await bus.nc.flush(timeout=5)
    finally:
        await bus.close()
        broker.stop()


async def test_a_broker_that_never_comes_is_named_once_the_start_up_wait_is_over():
    from server.bus.connection import Bus
    from server.errors import BusError
    from server.settings import Nats as NatsSettings
    from tests.serverproc import free_port

    url = f"nats://127.0.0.1:{free_port()}"
    bus = Bus([url], NatsSettings(reconnect_wait_s=0.1, startup_wait_s=0.5))
    with pytest.raises(BusError, match=re.escape(f"cannot connect to NATS at {url}: not reachable within "
                                                 "nats.startup_wait_s=0.5s")):
        await asyncio.wait_for(bus.connect(), 30)
