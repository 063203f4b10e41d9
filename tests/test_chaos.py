"""The crash loop (`python -m bench chaos`): the quick variant end to end, and its checks
on fabricated facts, so a check is seen to fail when what it guards is broken."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import chaos

REPO_ROOT = Path(__file__).resolve().parent.parent
QUICK_TIMEOUT_S = 150  # 3 kills and restarts take ~15 s; this only catches a hang
CLUSTER_TIMEOUT_S = 240  # 3 replicas start one after the other, then 3 kills: ~25 s; this only catches a hang


@pytest.mark.integration
@pytest.mark.timeout(QUICK_TIMEOUT_S + 20)
def test_quick_crash_loop_passes_every_check():
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "chaos", "--quick", "--seed", "7"], cwd=REPO_ROOT, capture_output=True,
        text=True, timeout=QUICK_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert figures["workload"] == "chaos"
    assert figures["iterations"] == chaos.QUICK_ITERATIONS
    assert figures["failed"] == 0
    assert set(figures["checks"]) == {check(_good_facts()).name for check in chaos.CHECKS}
    assert all(figures["checks"].values()), figures["checks"]
    assert figures["runs"] > 0 and not figures["given_up"]
    # every kind of run of the mix took part
    assert set(figures["runs_by_workflow"]) == set(chaos.TASK_STEPS)


@pytest.mark.integration
@pytest.mark.cluster
@pytest.mark.timeout(CLUSTER_TIMEOUT_S + 20)
def test_quick_crash_loop_on_three_replicas_passes_every_check(postgres_server):
    # the bench makes (and drops) a database of its own on the session's PostgreSQL
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "chaos", "--quick", "--seed", "11", "--replicas", "3", "--db", "postgres"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=CLUSTER_TIMEOUT_S,
        env={**os.environ, "BATON_TEST_POSTGRES_URL": postgres_server},
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (figures["db"], figures["replicas"], figures["iterations"]) == ("postgres", 3, chaos.QUICK_ITERATIONS)
    assert figures["failed"] == 0
    # SQLite's integrity check has nothing to run on PostgreSQL: n/a, not a pass
    integrity = _name(chaos.check_integrity)
    assert figures["checks"].pop(integrity) is None
    assert set(figures["checks"]) == {check(_good_facts()).name for check in chaos.CHECKS} - {integrity}
    assert all(figures["checks"].values()), figures["checks"]
    assert figures["runs"] > 0 and not figures["given_up"]
    assert sum(figures["kills_by_replica"].values()) == chaos.QUICK_ITERATIONS
    assert set(figures["runs_by_workflow"]) == set(chaos.TASK_STEPS)


def test_replicas_without_postgres_are_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "bench", "chaos", "--replicas", "2"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "--replicas needs --db postgres" in proc.stderr


# --- the checks on fabricated facts --------------------------------------------------------------

KILL_T = 100.0


def _run(run_id: str, workflow: str, status: str, workflow_id: str | None = None, **input) -> dict:
    return {"run_id": run_id, "workflow": workflow, "workflow_id": workflow_id, "status": status, "input": input}


def _step(run_id: str, key: str, status: str = "succeeded", attempt: int = 1, finished_at: float = 50.0) -> dict:
    return {"run_id": run_id, "key": key, "step_id": key, "status": status, "attempt": attempt,
            "finished_at": finished_at}


def _good_facts() -> chaos.Facts:
    """A chain that succeeded (its step `a` hit by the kill, so invoked twice) and a saga that
    failed at `ship` and compensated `charge` then `reserve`."""
    runs = [_run("r1", "chaos-chain", "succeeded", "chain-1"),
            _run("r2", "chaos-saga", "compensated", "saga-2", fail_at="ship")]
    steps = [_step("r1", "a", finished_at=KILL_T + 5), _step("r1", "b"), _step("r1", "c"),
             _step("r2", "reserve"), _step("r2", "charge"), _step("r2", "ship", "failed")]
    history = []
    for run_id, keys in (("r1", "abc"), ("r2", ("reserve", "charge"))):
        history += [{"run_id": run_id, "seq": i, "type": "task.succeeded", "key": k, "task_id": f"{run_id}:{k}:1"}
                    for i, k in enumerate(keys)]
    for i, k in enumerate(("charge", "reserve")):
        history += [
            {"run_id": "r2", "seq": 10 + 3 * i, "type": "compensation.scheduled", "key": k, "task_id": None},
            {"run_id": "r2", "seq": 11 + 3 * i, "type": "task.succeeded", "key": k, "task_id": f"r2:{k}:compensate:1"},
            {"run_id": "r2", "seq": 12 + 3 * i, "type": "compensation.succeeded", "key": k, "task_id": None},
        ]
    log = [{"run": "r1", "step": "a", "attempt": 1, "key": "r1:a:1", "kind": "invoke", "t": KILL_T - 1},
           {"run": "r1", "step": "a", "attempt": 1, "key": "r1:a:1", "kind": "invoke", "t": KILL_T + 3}]
    log += [{"run": "r1", "step": k, "attempt": 1, "key": f"r1:{k}:1", "kind": "invoke", "t": 10.0} for k in "bc"]
    log += [{"run": "r2", "step": k, "attempt": 1, "key": f"r2:{k}:1", "kind": "invoke", "t": 10.0}
            for k in ("reserve", "charge", "ship")]
    log += [{"run": "r2", "step": k, "attempt": 1, "key": f"r2:{k}:compensate:1", "kind": "compensate",
             "t": KILL_T + 10} for k in ("charge", "reserve")]
    ledger = chaos.Ledger(kills=[KILL_T], integrity=["ok"], answered={"chain-1": "r1", "saga-2": "r2"})
    facts = chaos.Facts(runs, steps, history, log, set(), 0, 0, ledger)
    facts.lifecycle_ids = chaos.expected_lifecycle(facts)
    facts.lifecycle_copies = len(facts.lifecycle_ids)
    return facts


def _failed(facts: chaos.Facts) -> set[str]:
    return {c.name for c in chaos.run_checks(facts) if not c.ok}


def _name(check) -> str:
    return check(_good_facts()).name


def test_good_facts_pass_every_check():
    assert _failed(_good_facts()) == set()


def test_an_invocation_beyond_the_bound_fails():
    facts = _good_facts()
    # a third call of r1:a: two calls are allowed (one attempt + one kill that hit it)
    facts.log.append({**facts.log[0], "t": KILL_T + 4})
    assert _failed(facts) == {_name(chaos.check_invocations)}


def test_a_repeat_without_a_kill_in_its_window_fails():
    facts = _good_facts()
    facts.log.append({"run": "r1", "step": "b", "attempt": 1, "key": "r1:b:1", "kind": "invoke", "t": 11.0})
    assert _failed(facts) == {_name(chaos.check_invocations)}


def test_an_invocation_of_an_unrecorded_attempt_fails():
    facts = _good_facts()
    facts.log.append({"run": "r1", "step": "c", "attempt": 2, "key": "r1:c:2", "kind": "invoke", "t": KILL_T + 1})
    assert _name(chaos.check_invocations) in _failed(facts)


def test_a_run_that_is_not_terminal_fails():
    facts = _good_facts()
    facts.runs[0]["status"] = "running"
    assert _name(chaos.check_terminal) in _failed(facts)


def test_a_saga_that_succeeded_although_told_to_fail_fails():
    facts = _good_facts()
    facts.runs.append(_run("r3", "chaos-saga", "succeeded", "saga-3", fail_at="charge"))
    assert _name(chaos.check_terminal) in _failed(facts)


def test_a_second_run_for_a_workflow_id_fails():
    facts = _good_facts()
    facts.runs.append(_run("r9", "chaos-chain", "succeeded", "chain-1"))
    assert _name(chaos.check_workflow_ids) in _failed(facts)


def test_a_second_run_for_an_event_fails():
    facts = _good_facts()
    facts.ledger.events = {"ev-1"}
    facts.runs += [_run("e1", "chaos-event", "succeeded", eid="ev-1"), _run("e2", "chaos-event", "succeeded", eid="ev-1")]
    facts.lifecycle_ids |= chaos.expected_lifecycle(facts)
    assert _failed(facts) == {_name(chaos.check_events)}


def test_a_result_recorded_twice_fails():
    facts = _good_facts()
    facts.history.append({"run_id": "r1", "seq": 99, "type": "task.succeeded", "key": "c", "task_id": "r1:c:1"})
    assert _name(chaos.check_recorded_once) in _failed(facts)


def test_a_result_delivered_again_and_ignored_is_not_a_second_result():
    facts = _good_facts()
    facts.history += [{"run_id": "r1", "seq": 98, "type": "task.succeeded", "key": "c", "task_id": "r1:c:1"},
                      {"run_id": "r1", "seq": 99, "type": "task.ignored", "key": None, "task_id": "r1:c:1"}]
    facts.history.sort(key=lambda h: (h["run_id"], h["seq"]))
    assert _failed(facts) == set()


def test_compensations_out_of_order_fail():
    facts = _good_facts()
    comps = [h for h in facts.history if h["type"] == "compensation.succeeded"]
    comps[0]["key"], comps[1]["key"] = comps[1]["key"], comps[0]["key"]
    assert _failed(facts) == {_name(chaos.check_compensations)}


def test_a_compensation_of_a_succeeded_run_fails():
    facts = _good_facts()
    facts.log.append({"run": "r1", "step": "a", "attempt": 1, "key": "r1:a:compensate:1", "kind": "compensate",
                      "t": 30.0})
    assert _failed(facts) == {_name(chaos.check_compensations)}


def test_an_undo_called_twice_without_a_kill_fails():
    facts = _good_facts()
    facts.log.append({"run": "r2", "step": "reserve", "attempt": 1, "key": "r2:reserve:compensate:1",
                      "kind": "compensate", "t": KILL_T + 11})
    assert _failed(facts) == {_name(chaos.check_compensations)}


def test_a_lifecycle_event_missing_from_the_stream_fails():
    facts = _good_facts()
    facts.lifecycle_ids.discard("r2:compensated:1")
    assert _failed(facts) == {_name(chaos.check_lifecycle)}


def test_no_integrity_check_on_postgres_is_not_applicable_rather_than_a_pass():
    facts = _good_facts()
    facts.ledger.integrity = None
    [check] = [c for c in chaos.run_checks(facts) if c.name == _name(chaos.check_integrity)]
    assert check.ok and not check.applies


def test_a_failed_integrity_check_fails():
    facts = _good_facts()
    facts.ledger.integrity = ["*** in database main ***\nPage 5 is never used"]
    assert _failed(facts) == {_name(chaos.check_integrity)}


def test_the_checks_do_not_change_the_facts():
    facts = _good_facts()
    before = copy.deepcopy(facts)
    chaos.run_checks(facts)
    assert facts == before
