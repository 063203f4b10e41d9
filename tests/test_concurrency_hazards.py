"""Concurrency hazards: requests that race each other on one run, over real HTTP (the API
on loopback, the real runtime and SQLite) and over NATS (a real nats-server).

The policies these tests hold the server to (README, "Signals"; RELIABILITY.md):

* **A signal is delivered once, to a step waiting for it.** The first of many identical
  signals sent at once is delivered (202; NATS: `ok`); every other one finds no step
  waiting and is refused with 409 `conflict` (NATS: `conflict`), naming the signal. Not
  buffered, not applied twice: the history holds one `signal.received`, the step
  resumes once. A sender that did not get its answer sends again and gets 409: that
  means "delivered already or nobody waits", never a second delivery.
* **Cancel against completion: one winner, one terminal state.** A cancel that arrives
  after the run finished is 409; one that arrives first wins, and the completion that
  follows is ignored. Either way the run ends once, the API and the history agree, and
  a run that succeeded never compensates or cancels afterwards.
* **Retry only a finished, unsuccessful run.** A retry of a running run is 409 naming
  its status; of many retries sent at once to a cancelled run, one starts the next
  attempt and the rest are 409. The same holds for many cancels sent at once.

The runtime decides every request about a run in one pump, in arrival order, checking
each against the state the previous ones left (server/runtime/runner.py, `_process`):
that is why these races have one winner.
"""

from __future__ import annotations

import asyncio
from typing import Any

import nats
import orjson
import pytest

from server.settings import Settings, load_settings
from tests.inproc import api_client, eventually
from tests.sample_workflows import APPROVAL

SIGNALS_AT_ONCE = 50
RACES = 24  # runs per cancel-against-completion race; each outcome should show up

# The last step completes by a signal (the race is decided in the pump) or by a short
# task (the race is with a handler's completion); the first step has a compensation,
# which must run only for a cancelled run.
LAST_SIGNAL = """\
name: last-signal
steps:
  - id: reserve
    task: echo
    input: {n: 1}
    compensate: {task: echo, input: {undo: true}}
  - id: finish
    wait_for_signal: {signal: go}
"""
LAST_TASK = """\
name: last-task
steps:
  - id: reserve
    task: echo
    input: {n: 1}
    compensate: {task: echo, input: {undo: true}}
  - id: finish
    task: sleep
    input: {seconds: 0.2}
"""
TERMINAL_EVENTS = {"run.succeeded", "run.failed", "run.cancelled", "run.compensated"}


def settings_for(tmp_path) -> Settings:
    wf = tmp_path / "wf"
    wf.mkdir(exist_ok=True)
    for name, text in (("approval", APPROVAL), ("last-signal", LAST_SIGNAL), ("last-task", LAST_TASK)):
        (wf / f"{name}.yaml").write_text(text)
    return Settings(data_dir=tmp_path / "data", workflows=[wf], handler_modules=[], nats={"enabled": False},
                    auth={"enabled": False})


@pytest.fixture
async def api(tmp_path):
    async with api_client(settings_for(tmp_path)) as client:
        yield client


async def post(client, path: str, **kwargs: Any) -> tuple[int, dict]:
    response = await client.post(path, **kwargs)
    return response.status, await response.json()


async def get(client, path: str) -> dict:
    response = await client.get(path)
    assert response.status == 200, await response.text()
    return await response.json()


async def start(client, workflow: str) -> str:
    status, run = await post(client, f"/v1/workflows/{workflow}/runs", json={"input": None})
    assert status == 201, run
    return run["run_id"]


async def waiting_for(client, run_id: str, signal: str) -> None:
    async def waits() -> bool:
        return signal in (await get(client, f"/v1/runs/{run_id}"))["waiting_for"]
    await eventually(waits, f"run {run_id} to wait for {signal!r}")


async def finished(client, run_id: str) -> dict:
    run = await get(client, f"/v1/runs/{run_id}/wait?timeout=10")
    assert run["status"] in ("succeeded", "failed", "cancelled", "compensated"), run
    return run


async def history_types(client, run_id: str) -> list[str]:
    return [e["type"] for e in (await get(client, f"/v1/runs/{run_id}/history"))["events"]]


def conflicts(answers: list[tuple[int, dict]]) -> list[dict]:
    return [body["error"] for status, body in answers if status == 409]


# --- the same signal, 50 times at once ----------------------------------------------


async def test_fifty_identical_signals_at_once_deliver_one_and_refuse_the_rest_with_409(api):
    run_id = await start(api, "approval")
    await waiting_for(api, run_id, "approve")
    answers = await asyncio.gather(*(post(api, f"/v1/runs/{run_id}/signals/approve", json={"data": {"n": i}})
                                     for i in range(SIGNALS_AT_ONCE)))
    delivered = [i for i, (status, _) in enumerate(answers) if status == 202]
    assert len(delivered) == 1, [status for status, _ in answers]
    refused = conflicts(answers)
    assert len(refused) == SIGNALS_AT_ONCE - 1
    assert all(e["code"] == "conflict" and e["field"] == "name" and "'approve'" in e["message"] for e in refused)

    run = await finished(api, run_id)
    assert run["status"] == "succeeded"
    types = await history_types(api, run_id)
    assert types.count("signal.received") == 1, types
    detail = await get(api, f"/v1/runs/{run_id}")
    steps = {s["key"]: s for s in detail["steps"]}
    assert steps["gate"]["output"] == {"n": delivered[0]}  # the winner's data, resumed once
    assert steps["done"]["output"] == {"approved": {"n": delivered[0]}}
    assert types.count("step.scheduled") == 2, types  # prepare and done, each once


async def test_fifty_identical_nats_signals_at_once_deliver_one_and_refuse_the_rest(tmp_path, monkeypatch, nats_server):
    from server.app import open_runtime

    wf = tmp_path / "wf"
    wf.mkdir()
    (wf / "approval.yaml").write_text(APPROVAL)
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("{}\n")
    monkeypatch.setenv("BATON_CONFIG", str(cfg))
    settings = load_settings(data_dir=tmp_path / "data", workflows=[wf], nats_url=nats_server.url,
                             limits={"shutdown_grace_s": 0.2})
    async with open_runtime(settings) as rt:
        run, _ = await rt.start_run("approval", None)
        run_id = run["run_id"]

        async def waits() -> bool:
            return "approve" in (await rt.get_run(run_id))["waiting_for"]
        await eventually(waits, "the run to wait for approve")
        nc = await nats.connect(nats_server.url)
        try:
            replies = await asyncio.gather(*(nc.request(f"baton.signal.{run_id}.approve", orjson.dumps({"n": i}),
                                                        timeout=10) for i in range(SIGNALS_AT_ONCE)))
        finally:
            await nc.close()
        answers = [orjson.loads(reply.data) for reply in replies]
        assert sum(a["ok"] for a in answers) == 1, answers
        assert all(a["error"]["code"] == "conflict" for a in answers if not a["ok"])
        assert (await rt.wait(run_id, 10))["status"] == "succeeded"
        types = [e["type"] for e in await rt.history(run_id)]
        assert types.count("signal.received") == 1, types


# --- cancel racing completion -------------------------------------------------------


async def _one_terminal_state(client, run_id: str, cancel_status: int) -> str:
    """The run ended once, the API and the history agree, and the cancel's answer says
    who won: 202 cancelled it (its compensation ran), 409 came after it succeeded (and
    nothing was compensated or cancelled after that)."""
    run = await finished(client, run_id)
    types = await history_types(client, run_id)
    ends = [t for t in types if t in TERMINAL_EVENTS]
    assert ends == [f"run.{run['status']}"], (run["status"], types)
    if cancel_status == 202:
        assert run["status"] == "cancelled", run
        assert "run.cancel_requested" in types and "compensation.scheduled" in types, types
    else:
        assert cancel_status == 409 and run["status"] == "succeeded", (cancel_status, run)
        assert "compensation.scheduled" not in types and "run.cancel_requested" not in types, types
    return run["status"]


async def test_cancel_racing_the_signal_that_completes_the_run(api):
    runs = [await start(api, "last-signal") for _ in range(RACES)]
    for run_id in runs:
        await waiting_for(api, run_id, "go")

    async def race(i: int, run_id: str) -> str:
        signal = post(api, f"/v1/runs/{run_id}/signals/go", json={"data": i})
        cancel = post(api, f"/v1/runs/{run_id}/cancel", json={"reason": "race"})
        # which one is sent first alternates, so both orders are raced
        (s, signalled), (c, cancelled) = await asyncio.gather(signal, cancel) if i % 2 else \
            reversed(await asyncio.gather(cancel, signal))
        assert sorted([s, c]) == [202, 409], (s, signalled, c, cancelled)  # exactly one of them won
        return await _one_terminal_state(api, run_id, c)

    outcomes = await asyncio.gather(*(race(i, run_id) for i, run_id in enumerate(runs)))
    assert set(outcomes) <= {"succeeded", "cancelled"}


async def test_cancel_racing_the_last_task_completing(api):
    """The cancel is sent while the last step's task is finishing, at offsets spread
    across its duration: early ones cancel it, late ones meet a finished run."""
    runs = [await start(api, "last-task") for _ in range(RACES)]

    async def race(i: int, run_id: str) -> tuple[str, int]:
        async def finishing() -> bool:
            detail = await get(api, f"/v1/runs/{run_id}")
            steps = {s["key"]: s["status"] for s in detail["steps"]}
            return steps.get("finish", "pending") != "pending" or detail["status"] != "running"
        await eventually(finishing, f"run {run_id}'s last step to start")
        await asyncio.sleep(i * 0.01)  # spreads the cancels over the task's 200 ms: not a wait for a state
        status, body = await post(api, f"/v1/runs/{run_id}/cancel", json={"reason": "race"})
        assert status in (202, 409), body
        if status == 409:
            assert "already succeeded" in body["error"]["message"], body
        return await _one_terminal_state(api, run_id, status), status

    outcomes = await asyncio.gather(*(race(i, run_id) for i, run_id in enumerate(runs)))
    assert {status for status, _ in outcomes} <= {"succeeded", "cancelled"}


async def test_many_cancels_at_once_cancel_once(api):
    run_id = await start(api, "last-signal")
    await waiting_for(api, run_id, "go")
    answers = await asyncio.gather(*(post(api, f"/v1/runs/{run_id}/cancel", json={"reason": f"r{i}"})
                                     for i in range(20)))
    assert [status for status, _ in answers].count(202) == 1, answers
    assert all(e["code"] == "conflict" for e in conflicts(answers)) and len(conflicts(answers)) == 19
    await _one_terminal_state(api, run_id, 202)
    assert (await history_types(api, run_id)).count("run.cancel_requested") == 1


# --- retry while running --------------------------------------------------------------


async def test_retry_of_a_running_run_is_409_naming_its_status(api):
    run_id = await start(api, "approval")
    await waiting_for(api, run_id, "approve")
    status, body = await post(api, f"/v1/runs/{run_id}/retry")
    assert status == 409 and body["error"]["code"] == "conflict", body
    assert "is running" in body["error"]["message"] and "only failed, compensated or cancelled" in body["error"]["message"]
    assert "run.retry_requested" not in await history_types(api, run_id)
    # and the run goes on as if nothing had been asked
    assert (await post(api, f"/v1/runs/{run_id}/signals/approve", json={"data": 1}))[0] == 202
    assert (await finished(api, run_id))["status"] == "succeeded"


async def test_many_retries_at_once_start_one_new_attempt(api):
    run_id = await start(api, "approval")
    await waiting_for(api, run_id, "approve")
    assert (await post(api, f"/v1/runs/{run_id}/cancel", json={"reason": "to retry"}))[0] == 202
    assert (await finished(api, run_id))["status"] == "cancelled"
    answers = await asyncio.gather(*(post(api, f"/v1/runs/{run_id}/retry") for _ in range(20)))
    accepted = [body for status, body in answers if status == 202]
    assert len(accepted) == 1 and accepted[0]["attempt"] == 2, answers
    refused = conflicts(answers)
    assert len(refused) == 19 and all("only failed, compensated or cancelled" in e["message"] for e in refused)
    assert (await history_types(api, run_id)).count("run.retry_requested") == 1
    await waiting_for(api, run_id, "approve")  # the one new attempt waits again
