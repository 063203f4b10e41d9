"""The runtime in-process, against a real SQLite file: concurrency limits, retries
through real timers, compensation, cancellation of queued runs, restart."""

from __future__ import annotations

import asyncio

import pytest

from handlers import handler
from server.app import open_runtime
from server.errors import Conflict, InvalidInput, WorkflowNotFound
from server.settings import load_settings

GATES: dict[str, asyncio.Event] = {}
RUNNING: set[str] = set()
PEAK = {"n": 0}


@handler("test.gate")
async def gate(ctx, name: str):
    """Blocks until the test opens the gate with this name; tracks how many run at once."""
    RUNNING.add(ctx.run_id)
    PEAK["n"] = max(PEAK["n"], len(RUNNING))
    try:
        await GATES.setdefault(name, asyncio.Event()).wait()
    finally:
        RUNNING.discard(ctx.run_id)
    return name


LIMITED = """
name: limited
concurrency: {limit: 2, key: "{{ input.team }}"}
steps:
  - id: work
    task: test.gate
    input: {name: "{{ input.gate }}"}
"""

FLAKY = """
name: flaky
steps:
  - id: once
    task: fail
    input: {times: 2}
    retry: {max_attempts: 3, initial_delay: 0.01, jitter: 0}
  - id: saga
    task: echo
    input: {v: 1}
    compensate: {task: echo, input: {undo: true}}
  - id: boom
    task: fail
    input: {retryable: false}
    when: "input.boom"
"""


CHILD = """
name: child
input_schema: {type: object, required: [n]}
steps:
  - id: double
    task: echo
    input: {n2: "{{ input.n * 2 }}"}
  - id: maybe_fail
    task: fail
    input: {retryable: false}
    when: "input.fail | default(false)"
"""

PARENT = """
name: parent
steps:
  - id: sub
    workflow: {name: child, input: {n: "{{ input.n }}", fail: "{{ input.fail }}"}}
  - id: use
    task: echo
    input: {got: "{{ steps.sub.output }}"}
output: "{{ steps.use.output.got }}"
"""


NAP = """
name: nap
steps:
  - id: zz
    sleep: 0.4s
  - id: after
    task: echo
    input: {woke: true}
"""


@pytest.fixture
def settings(tmp_path):
    wf = tmp_path / "wf"
    wf.mkdir()
    (wf / "limited.yaml").write_text(LIMITED)
    (wf / "flaky.yaml").write_text(FLAKY)
    (wf / "child.yaml").write_text(CHILD)
    (wf / "nap.yaml").write_text(NAP)
    (wf / "parent.yaml").write_text(PARENT)
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("{}\n")
    import os

    os.environ["BATON_CONFIG"] = str(cfg)
    try:
        yield load_settings(data_dir=tmp_path / "data", workflows=[wf], handler_modules=["tests.test_runtime"],
                            limits={"shutdown_grace_s": 0.2})
    finally:
        os.environ.pop("BATON_CONFIG", None)


async def wait_until(predicate, what: str, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.005)


async def test_concurrency_limit_queues_runs_per_key_and_admits_in_order(settings):
    GATES.clear()
    PEAK["n"] = 0
    async with open_runtime(settings) as rt:
        runs = [(await rt.start_run("limited", {"team": "a", "gate": f"g{i}"}))[0] for i in range(4)]
        other, _ = await rt.start_run("limited", {"team": "b", "gate": "gb"})
        await wait_until(lambda: len(RUNNING) == 3, "two of team a and one of team b running")
        statuses = [(await rt.get_run(r["run_id"]))["status"] for r in runs]
        assert statuses == ["running", "running", "queued", "queued"]
        # cancelling a queued run frees nothing and starts nothing
        await rt.cancel(runs[3]["run_id"])
        assert (await rt.get_run(runs[3]["run_id"]))["status"] == "cancelled"
        GATES.setdefault("g0", asyncio.Event()).set()
        assert (await rt.wait(runs[0]["run_id"], 5))["status"] == "succeeded"
        await wait_until(lambda: runs[2]["run_id"] in RUNNING, "the queued run to be admitted")
        for name in ("g1", "g2", "gb"):
            GATES.setdefault(name, asyncio.Event()).set()
        for r in (runs[1], runs[2], other):
            assert (await rt.wait(r["run_id"], 5))["status"] == "succeeded"
        assert PEAK["n"] == 3
        history = [h["type"] for h in await rt.history(runs[2]["run_id"])]
        assert history[:2] == ["run.queued", "run.started"]


async def test_queued_runs_survive_a_restart(settings):
    GATES.clear()
    async with open_runtime(settings) as rt:
        first = (await rt.start_run("limited", {"team": "x", "gate": "h0"}))[0]
        second = (await rt.start_run("limited", {"team": "x", "gate": "h0"}))[0]
        third = (await rt.start_run("limited", {"team": "x", "gate": "h0"}))[0]
        await wait_until(lambda: len(RUNNING) == 2, "two running")
    # stopped with two handlers cut short and one run queued
    GATES.setdefault("h0", asyncio.Event()).set()
    async with open_runtime(settings) as rt:
        for r in (first, second, third):
            assert (await rt.wait(r["run_id"], 5))["status"] == "succeeded"


async def test_retries_use_real_timers_and_failure_compensates(settings):
    async with open_runtime(settings) as rt:
        ok, _ = await rt.start_run("flaky", {"boom": False})
        assert (await rt.wait(ok["run_id"], 5))["status"] == "succeeded"
        detail = await rt.get_run(ok["run_id"])
        assert detail["steps"][0]["attempt"] == 3
        assert detail["steps"][2]["status"] == "skipped"

        bad, _ = await rt.start_run("flaky", {"boom": True})
        assert (await rt.wait(bad["run_id"], 5))["status"] == "compensated"
        detail = await rt.get_run(bad["run_id"])
        assert detail["steps"][1]["compensation"]["status"] == "succeeded"
        types = [h["type"] for h in await rt.history(bad["run_id"])]
        assert "compensation.succeeded" in types and types[-1] == "run.compensated"

        with pytest.raises(Conflict):
            await rt.retry(ok["run_id"])
        retried = await rt.retry(bad["run_id"])
        assert retried["attempt"] == 2


async def test_start_errors_name_the_problem(settings):
    async with open_runtime(settings) as rt:
        with pytest.raises(WorkflowNotFound):
            await rt.start_run("nope", {})
        with pytest.raises(Conflict):
            await rt.signal((await rt.start_run("flaky", {"boom": False}))[0]["run_id"], "go")
        limited_without_team = {"gate": "z"}
        with pytest.raises(InvalidInput):
            await rt.start_run("limited", limited_without_team)


async def test_child_workflow_output_flows_to_the_parent_and_failure_fails_it(settings):
    async with open_runtime(settings) as rt:
        ok, _ = await rt.start_run("parent", {"n": 21, "fail": False})
        assert (await rt.wait(ok["run_id"], 5))["status"] == "succeeded"
        detail = await rt.get_run(ok["run_id"])
        assert detail["output"] == {"n2": 42}
        children, _ = await rt.list_runs(workflow="child")
        assert len(children) == 1 and children[0]["status"] == "succeeded"

        bad, _ = await rt.start_run("parent", {"n": 1, "fail": True})
        assert (await rt.wait(bad["run_id"], 5))["status"] == "failed"
        detail = await rt.get_run(bad["run_id"])
        assert detail["steps"][0]["error"]["type"] == "NonRetryableError"


async def test_a_sleep_that_falls_due_while_the_server_is_down_fires_once_after_restart(settings):
    async with open_runtime(settings) as rt:
        run, _ = await rt.start_run("nap", {})
        detail = await rt.get_run(run["run_id"])
        assert detail["steps"][0]["status"] == "waiting"
        assert await rt.store.count_timers() == 1
    started = detail["steps"][0]["started_at"]
    async with open_runtime(settings) as rt:
        done = await rt.wait(run["run_id"], 5)
        assert done["status"] == "succeeded"
        history = [h["type"] for h in await rt.history(run["run_id"])]
        assert history.count("timer.fired") == 1
        assert await rt.store.count_timers() == 0
        nap = (await rt.get_run(run["run_id"]))["steps"][0]
        assert nap["finished_at"] > started


WAITER = """
name: waiter
steps:
  - id: gate
    wait_for_signal: {signal: go}
"""


async def test_concurrent_signals_to_one_waiting_run_deliver_exactly_once(settings):
    (settings.workflows[0] / "waiter.yaml").write_text(WAITER)
    async with open_runtime(settings) as rt:
        run, _ = await rt.start_run("waiter", {})
        results = await asyncio.gather(*[rt.signal(run["run_id"], "go", {"n": i}) for i in range(20)],
                                       return_exceptions=True)
        delivered = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, Conflict)]
        assert len(delivered) == 1 and len(refused) == 19, results
        assert (await rt.wait(run["run_id"], 5))["status"] == "succeeded"
        history = [h["type"] for h in await rt.history(run["run_id"])]
        assert history.count("signal.received") == 1
