"""Signals over NATS against a real nats-server: `baton.signal.<run_id>.<name>`
delivers like the HTTP endpoint, request/reply answers with the outcome."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import nats
import orjson
import pytest
from nats.aio.client import Client

from server.app import open_runtime
from server.bus.connection import flush_all
from server.bus.signals import SignalListener, parse_subject
from server.errors import BadRequest, Conflict
from server.settings import load_settings
from tests import sample_workflows

pytestmark = pytest.mark.integration

# the shared approval workflow, with the signal's payload as the run's output
APPROVAL = sample_workflows.APPROVAL + 'output: "{{ steps.done.output.approved }}"\n'

DOTTED = """
name: dotted
steps:
  - id: gate
    wait_for_signal: {signal: deploy.prod.ok}
"""

MAX_BODY_BYTES = 1024  # the smallest limit the settings allow


@pytest.fixture
def settings(tmp_path, monkeypatch, nats_server):
    wf = tmp_path / "wf"
    wf.mkdir()
    (wf / "approval.yaml").write_text(APPROVAL)
    (wf / "dotted.yaml").write_text(DOTTED)
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("{}\n")
    monkeypatch.setenv("BATON_CONFIG", str(cfg))
    return load_settings(data_dir=tmp_path / "data", workflows=[wf], nats_url=nats_server.url,
                         limits={"shutdown_grace_s": 0.2, "max_body_bytes": MAX_BODY_BYTES})


@pytest.fixture
async def client(nats_server) -> AsyncIterator[Client]:
    nc = await nats.connect(nats_server.url)
    yield nc
    await nc.close()


async def waiting(rt, workflow: str, signal: str) -> str:
    """Start a run and return its id once it waits for `signal`."""
    run, _ = await rt.start_run(workflow, {})
    async with asyncio.timeout(5):
        while signal not in (await rt.get_run(run["run_id"]))["waiting_for"]:
            await asyncio.sleep(0.005)
    return run["run_id"]


async def ask(nc: Client, subject: str, body: bytes = b"", headers: dict[str, str] | None = None) -> dict[str, Any]:
    reply = await nc.request(subject, body, timeout=5, headers=headers)
    return orjson.loads(reply.data)


async def test_request_delivers_the_signal_and_replies_with_the_run(settings, client):
    async with open_runtime(settings) as rt:
        run_id = await waiting(rt, "approval", "approve")
        reply = await ask(client, f"baton.signal.{run_id}.approve", b'{"by": "alice", "ok": true}',
                          headers={"Baton-By": "alice@example.com"})
        assert reply["ok"] is True
        assert reply["run"]["run_id"] == run_id and reply["run"]["workflow"] == "approval"
        done = await rt.wait(run_id, 5)
        assert done["status"] == "succeeded"
        detail = await rt.get_run(run_id)
        assert detail["output"] == {"by": "alice", "ok": True}
        gate = next(s for s in detail["steps"] if s["step_id"] == "gate")
        assert gate["output"] == {"by": "alice", "ok": True}
        received = [h for h in await rt.history(run_id) if h["type"] == "signal.received"]
        assert received[0]["data"]["by"] == "alice@example.com"


async def test_a_plain_publish_delivers_too(settings, client):
    async with open_runtime(settings) as rt:
        run_id = await waiting(rt, "approval", "approve")
        await client.publish(f"baton.signal.{run_id}.approve", b"")
        await client.flush()
        assert (await rt.wait(run_id, 5))["status"] == "succeeded"
        assert (await rt.get_run(run_id))["output"] is None  # an empty body is null
        received = [h for h in await rt.history(run_id) if h["type"] == "signal.received"]
        assert received[0]["data"]["by"] == "nats"


async def test_a_signal_name_may_contain_dots(settings, client):
    async with open_runtime(settings) as rt:
        run_id = await waiting(rt, "dotted", "deploy.prod.ok")
        reply = await ask(client, f"baton.signal.{run_id}.deploy.prod.ok", b'"go"')
        assert reply["ok"] is True
        assert (await rt.wait(run_id, 5))["status"] == "succeeded"


async def test_refused_signals_get_an_error_reply_with_the_http_code(settings, client):
    async with open_runtime(settings) as rt:
        run_id = await waiting(rt, "approval", "approve")

        unknown = await ask(client, "baton.signal.nope.approve", b"{}")
        assert unknown["ok"] is False
        assert unknown["error"]["code"] == "run_not_found" and unknown["error"]["field"] == "run_id"

        wrong_name = await ask(client, f"baton.signal.{run_id}.reject", b"{}")
        assert wrong_name["error"]["code"] == "conflict" and wrong_name["error"]["field"] == "name"
        assert "waiting for: approve" in wrong_name["error"]["message"]

        bad_json = await ask(client, f"baton.signal.{run_id}.approve", b'{"by": ')
        assert bad_json["error"]["code"] == "bad_json" and "invalid JSON" in bad_json["error"]["message"]

        no_name = await ask(client, f"baton.signal.{run_id}", b"{}")
        assert no_name["error"]["code"] == "bad_request" and no_name["error"]["field"] == "subject"

        too_big = await ask(client, f"baton.signal.{run_id}.approve", orjson.dumps("x" * MAX_BODY_BYTES))
        assert too_big["error"]["code"] == "payload_too_large"

        # none of the refused signals touched the run; a good one still lands, a second one is refused
        assert (await ask(client, f"baton.signal.{run_id}.approve", b"1"))["ok"] is True
        assert (await rt.wait(run_id, 5))["status"] == "succeeded"
        again = await ask(client, f"baton.signal.{run_id}.approve", b"1")
        assert again["error"]["code"] == "conflict" and "already succeeded" in again["error"]["message"]


async def test_a_refused_signal_without_reply_is_logged(settings, client, caplog):
    caplog.set_level(logging.WARNING, logger="baton.signals")
    async with open_runtime(settings):
        await client.publish("baton.signal.nope.approve", b"{}")
        await client.flush()
        async with asyncio.timeout(5):
            while not any("nope" in r.getMessage() for r in caplog.records):
                await asyncio.sleep(0.005)
    record = next(r for r in caplog.records if "nope" in r.getMessage())
    assert record.levelno == logging.WARNING and "run_not_found" in record.getMessage()


def test_parse_subject_splits_the_run_id_from_a_dotted_name():
    assert parse_subject("baton.signal.r1.approve") == ("r1", "approve")
    assert parse_subject("baton.signal.r1.a.b.c") == ("r1", "a.b.c")
    for bad in ("baton.signal.r1", "baton.signal.r1.", "baton.signal..x", "other.r1.x"):
        with pytest.raises(BadRequest):
            parse_subject(bad)


# --- the listener alone, with a runtime that the test controls ---------------------------


class SlowRuntime:
    """Answers `signal` when the test releases the signal's name; counts those in flight."""

    def __init__(self) -> None:
        self.gates: dict[str, asyncio.Event] = {}
        self.inflight = 0
        self.peak = 0

    async def signal(self, run_id: str, name: str, payload: Any = None, *, by: str | None = None) -> dict[str, Any]:
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        try:
            await self.gates.setdefault(name, asyncio.Event()).wait()
        finally:
            self.inflight -= 1
        if name == "refuse":
            raise Conflict("refused on purpose", field="name")
        return {"run_id": run_id, "signal": name}


async def test_a_slow_signal_does_not_hold_up_the_others(bus, client):
    rt = SlowRuntime()
    listener = SignalListener(bus, rt)  # type: ignore[arg-type]
    await listener.start()
    try:
        slow = asyncio.create_task(ask(client, "baton.signal.r1.slow"))
        async with asyncio.timeout(5):
            while rt.inflight < 1:
                await asyncio.sleep(0.005)
        rt.gates.setdefault("fast", asyncio.Event()).set()
        assert (await ask(client, "baton.signal.r2.fast"))["run"] == {"run_id": "r2", "signal": "fast"}
        assert not slow.done()
        rt.gates["slow"].set()
        assert (await slow)["ok"] is True
    finally:
        await listener.stop()


async def test_signals_in_flight_are_bounded_and_finish_on_stop(bus, client):
    rt = SlowRuntime()
    listener = SignalListener(bus, rt, max_inflight=2)  # type: ignore[arg-type]
    await listener.start()
    replies = [asyncio.create_task(ask(client, f"baton.signal.r{i}.{name}"))
               for i, name in enumerate(["hold", "hold", "hold", "refuse"])]
    async with asyncio.timeout(5):
        while rt.inflight < 2:
            await asyncio.sleep(0.005)
    await flush_all(client)  # every request has reached the server; two wait for a slot
    assert rt.inflight == 2
    rt.gates.setdefault("refuse", asyncio.Event()).set()
    rt.gates["hold"].set()
    stopping = asyncio.create_task(listener.stop())  # drains what was already received
    answers = await asyncio.gather(*replies)
    await stopping
    assert rt.peak == 2
    assert [a["ok"] for a in answers] == [True, True, True, False]
    assert answers[3]["error"] == {"code": "conflict", "message": "refused on purpose", "field": "name"}
