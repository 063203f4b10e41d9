"""GET /metrics: counters that match the runs exactly, state gauges that are right after
a restart, and the event consumer's metrics against a real nats-server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from handlers import handler
from server.settings import Settings, load_settings
from tests.inproc import api_client, call, eventually, runtime_of

GATES: dict[str, asyncio.Event] = {}


@handler("metrics.block")
async def block(ctx, name: str) -> str:
    """Holds its attempt until the test opens the gate `name`."""
    await GATES.setdefault(name, asyncio.Event()).wait()
    return name


WORKFLOWS = {
    "ok": """
name: ok
steps:
  - {id: a, task: noop}
  - {id: b, task: echo, input: {x: 1}}
""",
    "flaky": """
name: flaky
steps:
  - id: once
    task: fail
    input: {times: 2}
    retry: {max_attempts: 3, initial_delay: 0.01, jitter: 0}
""",
    "broken": """
name: broken
steps:
  - id: x
    task: fail
    retry: {max_attempts: 2, initial_delay: 0.01, jitter: 0}
""",
    "slow": """
name: slow
steps:
  - id: nap
    task: sleep
    input: {seconds: 30}
    timeout: 0.2s
""",
    "gate": """
name: gate
steps:
  - {id: a, task: noop}
  - {id: g, wait_for_signal: {signal: go}}
  - {id: c, task: noop}
""",
    "nap": """
name: nap
steps:
  - {id: z, sleep: 1h}
""",
    "short": """
name: short
steps:
  - {id: z, sleep: 0.05s}
""",
    "impatient": """
name: impatient
steps:
  - {id: w, wait_for_signal: {signal: go, timeout: 0.05s}}
""",
    "approve": """
name: approve
steps:
  - id: ask
    wait_for_signal: {approval: {message: ship it?}}
""",
    "limited": """
name: limited
concurrency: {limit: 1}
steps:
  - {id: w, wait_for_signal: {signal: go}}
""",
    "held": """
name: held
steps:
  - {id: h, task: metrics.block, input: {name: "{{ input.gate }}"}}
""",
}


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    wf = tmp_path / "wf"
    wf.mkdir(exist_ok=True)
    for name, text in WORKFLOWS.items():
        (wf / f"{name}.yaml").write_text(text)
    base: dict[str, Any] = dict(data_dir=tmp_path / "data", workflows=[wf], auth={"enabled": False},
                                nats={"enabled": False}, limits={"shutdown_grace_s": 0.5})
    return load_settings(**{**base, **overrides})


@pytest.fixture
def settings(tmp_path, monkeypatch) -> Settings:
    monkeypatch.chdir(tmp_path)  # keep the repository's config/baton.yaml out of it
    return make_settings(tmp_path)


class Scrape:
    """One scrape, parsed by prometheus-client's own parser."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def series(self, sample: str) -> dict[tuple[tuple[str, str], ...], float]:
        """Every sample of this name (`x_total`, `x_count`, `x_bucket` ...): sorted labels -> value."""
        return {tuple(sorted(s.labels.items())): s.value
                for family in self.families.values() for s in family.samples if s.name == sample}

    def value(self, sample: str, **labels: str) -> float | None:
        """The sample with exactly these labels, or None when it is absent."""
        return self.series(sample).get(tuple(sorted(labels.items())))


async def scrape(client: TestClient) -> Scrape:
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return Scrape(await response.text())


async def start(client: TestClient, workflow: str, input: Any = None) -> str:  # noqa: A002
    body = await call(client, "POST", f"/v1/workflows/{workflow}/runs", 201, json={"input": input or {}})
    return body["run_id"]


async def finish(client: TestClient, run_id: str) -> str:
    body = await call(client, "GET", f"/v1/runs/{run_id}/wait?timeout=10")
    return body["status"]


async def waiting(client: TestClient, run_id: str, what: str) -> None:
    async def check() -> bool:
        return what in (await call(client, "GET", f"/v1/runs/{run_id}"))["waiting_for"]
    await eventually(check, f"run {run_id} waiting for {what}")


async def sleeping(client: TestClient, run_id: str) -> None:
    async def check() -> bool:
        steps = (await call(client, "GET", f"/v1/runs/{run_id}"))["steps"]
        return any(s["status"] == "waiting" for s in steps)
    await eventually(check, f"run {run_id} asleep")


async def test_counters_and_gauges_match_the_runs(settings):
    async with api_client(settings) as client:
        ok = [await start(client, "ok") for _ in range(2)]
        flaky, broken, slow = await start(client, "flaky"), await start(client, "broken"), await start(client, "slow")
        short, impatient = await start(client, "short"), await start(client, "impatient")
        assert [await finish(client, r) for r in (*ok, flaky, broken, slow, short, impatient)] == \
            ["succeeded", "succeeded", "succeeded", "failed", "failed", "succeeded", "failed"]
        gate, nap = await start(client, "gate"), await start(client, "nap")
        approve, refuse = await start(client, "approve"), await start(client, "approve")
        await waiting(client, gate, "go")
        await waiting(client, approve, "approval:ask")
        await waiting(client, refuse, "approval:ask")
        await sleeping(client, nap)

        m = await scrape(client)
        assert m.series("baton_runs_started_total") == {
            (("workflow", w),): n for w, n in
            {"ok": 2, "flaky": 1, "broken": 1, "slow": 1, "short": 1, "impatient": 1, "gate": 1, "nap": 1,
             "approve": 2}.items()}
        assert m.series("baton_runs_finished_total") == {
            (("outcome", "succeeded"), ("workflow", "ok")): 2,
            (("outcome", "succeeded"), ("workflow", "flaky")): 1,
            (("outcome", "failed"), ("workflow", "broken")): 1,
            (("outcome", "failed"), ("workflow", "slow")): 1,
            (("outcome", "succeeded"), ("workflow", "short")): 1,
            (("outcome", "failed"), ("workflow", "impatient")): 1,
        }
        assert m.series("baton_step_retries_total") == {
            (("step", "once"), ("workflow", "flaky")): 2, (("step", "x"), ("workflow", "broken")): 1}
        assert m.series("baton_timeouts_total") == {
            (("kind", "step"), ("workflow", "slow")): 1, (("kind", "signal"), ("workflow", "impatient")): 1}
        assert m.series("baton_step_duration_seconds_count") == {
            (("outcome", o), ("step", s), ("workflow", w)): n for w, s, o, n in [
                ("ok", "a", "succeeded", 2), ("ok", "b", "succeeded", 2),
                ("flaky", "once", "failed", 2), ("flaky", "once", "succeeded", 1),
                ("broken", "x", "failed", 2), ("slow", "nap", "timed_out", 1), ("gate", "a", "succeeded", 1)]}
        assert m.value("baton_step_duration_seconds_bucket", workflow="slow", step="nap", outcome="timed_out",
                       le="0.1") == 0  # it ran for its 0.2 s timeout, not less
        waits = {("gate", "signal"): 1, ("nap", "sleep"): 1, ("approve", "approval"): 2,
                 ("short", "sleep"): 0, ("impatient", "signal"): 0}  # the last two: their waits ended
        assert {(w, k): m.value("baton_waiting_steps", workflow=w, kind=k) for w, k in waits} == waits
        for workflow, n in [("gate", 1), ("nap", 1), ("approve", 2), ("ok", 0), ("short", 0)]:
            assert m.value("baton_runs_active", workflow=workflow, status="running") == n
        assert m.value("baton_timers_pending") == 1  # the nap's hour: beyond the in-memory horizon
        assert m.value("baton_timers_armed") == 0
        assert m.value("baton_dead_letters_total") is None  # no NATS, no event consumer
        assert m.value("baton_store_commit_seconds_count") > 0

        await call(client, "POST", f"/v1/runs/{gate}/signals/go", 202, json={})
        await call(client, "POST", f"/v1/runs/{approve}/approval", 200, json={"decision": "approve"})
        await call(client, "POST", f"/v1/runs/{nap}/cancel", 202, json={})
        await call(client, "POST", f"/v1/runs/{refuse}/cancel", 202, json={})
        assert [await finish(client, r) for r in (gate, approve, nap, refuse)] == \
            ["succeeded", "succeeded", "cancelled", "cancelled"]
        m = await scrape(client)
        for workflow, kind in [("gate", "signal"), ("nap", "sleep"), ("approve", "approval")]:
            assert m.value("baton_waiting_steps", workflow=workflow, kind=kind) == 0
            assert m.value("baton_runs_active", workflow=workflow, status="running") == 0
        assert m.value("baton_runs_finished_total", workflow="nap", outcome="cancelled") == 1
        assert m.value("baton_runs_finished_total", workflow="approve", outcome="cancelled") == 1
        assert m.value("baton_timers_pending") == 0
        assert m.value("baton_step_duration_seconds_count", workflow="gate", step="c", outcome="succeeded") == 1


async def test_gauges_are_right_after_a_restart_and_counters_start_again(settings):
    async with api_client(settings) as client:
        gate, nap, approve = await start(client, "gate"), await start(client, "nap"), await start(client, "approve")
        first, second = await start(client, "limited"), await start(client, "limited")
        await waiting(client, gate, "go")
        await waiting(client, approve, "approval:ask")
        await waiting(client, first, "go")
        await sleeping(client, nap)
    async with api_client(settings) as client:
        m = await scrape(client)
        assert m.series("baton_runs_started_total") == {}
        for workflow, kind in [("gate", "signal"), ("nap", "sleep"), ("approve", "approval"), ("limited", "signal")]:
            assert m.value("baton_waiting_steps", workflow=workflow, kind=kind) == 1
        for workflow in ("gate", "nap", "approve", "limited"):
            assert m.value("baton_runs_active", workflow=workflow, status="running") == 1
        assert m.value("baton_runs_active", workflow="limited", status="queued") == 1
        # the counts move on from what was read: the queued run gets the slot
        await call(client, "POST", f"/v1/runs/{first}/signals/go", 202, json={})
        await waiting(client, second, "go")
        m = await scrape(client)
        assert m.value("baton_runs_active", workflow="limited", status="queued") == 0
        assert m.value("baton_runs_active", workflow="limited", status="running") == 1
        assert m.value("baton_waiting_steps", workflow="limited", kind="signal") == 1
        assert m.value("baton_runs_started_total", workflow="limited") == 1  # when it got its slot
        assert m.value("baton_runs_finished_total", workflow="limited", outcome="succeeded") == 1


async def test_handler_attempts_queued_behind_the_concurrency_limit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = make_settings(tmp_path, limits={"shutdown_grace_s": 0.5, "max_concurrent_tasks": 1})
    async with api_client(settings) as client:
        runs = [await start(client, "held", {"gate": f"h{i}"}) for i in range(3)]
        executor = runtime_of(client).executor

        async def one_running() -> bool:
            return len(executor) == 3 and executor.running == 1
        await eventually(one_running, "three attempts, one of them running")
        m = await scrape(client)
        assert (m.value("baton_tasks_running"), m.value("baton_tasks_queued")) == (1, 2)
        for i in range(3):
            GATES.setdefault(f"h{i}", asyncio.Event()).set()
        assert [await finish(client, r) for r in runs] == ["succeeded"] * 3
        m = await scrape(client)
        assert (m.value("baton_tasks_running"), m.value("baton_tasks_queued")) == (0, 0)
        assert m.value("baton_runtime_inbox_events") == 0


async def test_openmetrics_when_the_scraper_asks_for_it(settings):
    async with api_client(settings) as client:
        response = await client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        assert (await response.text()).endswith("# EOF\n")


# --- the event consumer, against a real nats-server ----------------------------------

ORDERS = """
name: on-order
concurrency: {limit: 1}
input_schema:
  type: object
  required: [order_id]
  properties: {order_id: {type: string}}
triggers:
  - event: {subject: "shop.orders.*", input: {order_id: "{{ event.data.order_id }}"}}
steps:
  - {id: hold, wait_for_signal: {signal: go}}
"""


def cloudevent(id_: str, data: Any) -> bytes:
    return orjson.dumps({"specversion": "1.0", "id": id_, "source": "/shop", "type": "order", "data": data})


@pytest.mark.integration
async def test_event_consumer_metrics_and_dead_letters(tmp_path, monkeypatch, nats_server):
    monkeypatch.chdir(tmp_path)
    wf = tmp_path / "events"
    wf.mkdir()
    (wf / "orders.yaml").write_text(ORDERS)
    settings = load_settings(data_dir=tmp_path / "data", workflows=[wf], nats_url=nats_server.url,
                             auth={"enabled": False}, limits={"shutdown_grace_s": 0.5})
    async with api_client(settings) as client:
        rt = runtime_of(client)
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()
            await js.publish("shop.orders.created", cloudevent("bad", {"order_id": 7}))  # fails the schema
            await js.publish("shop.orders.created", b"not json")

            async def dead_letters() -> Scrape | None:
                m = await scrape(client)
                return m if len(m.series("baton_dead_letters_total")) == 2 else None
            m = await eventually(dead_letters, "two dead letters")
            assert m.series("baton_dead_letters_total") == {(("workflow", "on-order"),): 1, (("workflow", ""),): 1}
            assert m.value("baton_event_redeliveries_total") == 0  # present from the start

            await js.publish("shop.orders.created", cloudevent("o1", {"order_id": "A"}))
            await eventually(lambda: _started(client, 1), "the first order's run")
            # the first run holds the workflow's one slot: the next order is handed back
            await js.publish("shop.orders.created", cloudevent("o2", {"order_id": "B"}))

            async def naked() -> Scrape | None:
                m = await scrape(client)
                return m if (m.value("baton_event_naks_total") or 0) >= 1 else None
            await eventually(naked, "the second order handed back")

            runs, _ = await rt.list_runs(workflow="on-order")
            await call(client, "POST", f"/v1/runs/{runs[0]['run_id']}/signals/go", 202, json={})

            m = await eventually(lambda: _started(client, 2), "the second order's run, after a redelivery")
            # every hand-back came round again, and the last one started the run
            assert m.value("baton_event_redeliveries_total") == m.value("baton_event_naks_total") >= 1
            assert m.value("baton_events_received_total") == 4 + m.value("baton_event_redeliveries_total")

            async def drained() -> Scrape | None:
                m = await scrape(client)
                lag = (m.value("baton_event_consumer_pending"), m.value("baton_event_consumer_ack_pending"))
                return m if lag == (0, 0) else None
            await eventually(drained, "the consumer caught up")
        finally:
            await nc.close()


async def _started(client: TestClient, n: int) -> Scrape | None:
    m = await scrape(client)
    return m if m.value("baton_runs_started_total", workflow="on-order") == n else None
