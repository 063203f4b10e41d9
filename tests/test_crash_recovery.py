"""A real server process killed with SIGKILL resumes its runs after a restart."""

from __future__ import annotations

import pytest

from tests.serverproc import ServerProcess

pytestmark = pytest.mark.integration


def start_server(tmp_path, name: str, definition: str, **env: str) -> tuple[ServerProcess, object, str]:
    """A server with one workflow and the counting handlers; a run of it started.
    Returns the server, the file each handler call appends to, and the run id."""
    wf = tmp_path / "wf"
    wf.mkdir()
    (wf / f"{name}.yaml").write_text(definition)
    counts = tmp_path / "invocations.txt"
    server = ServerProcess(tmp_path / "data", wf, ["tests.crash_handlers"], **env)
    server.start()
    status, run = server.request("POST", f"/v1/workflows/{name}/runs", {"input": {"path": str(counts)}})
    assert status == 201, run
    return server, counts, run["run_id"]

WAITING = """
name: crashy
steps:
  - id: first
    task: test.count
    input: {path: "{{ input.path }}"}
  - id: second
    task: test.count
    input: {path: "{{ input.path }}"}
  - id: approve
    wait_for_signal: {signal: go}
  - id: third
    task: test.count
    input: {path: "{{ input.path }}", label: "{{ steps.approve.output.by }}"}
"""


def test_sigkill_while_waiting_for_a_signal_loses_and_repeats_nothing(tmp_path):
    server, counts, run_id = start_server(tmp_path, "crashy", WAITING)
    try:
        server.wait_for(lambda: server.request("GET", f"/v1/runs/{run_id}")[1]["waiting_for"] == ["go"], "the approval wait")

        server.kill()
        server.start()

        status, body = server.request("POST", f"/v1/runs/{run_id}/signals/go", {"data": {"by": "alice"}})
        assert status == 202, body
        status, done = server.request("GET", f"/v1/runs/{run_id}/wait?timeout=15", timeout_s=20)
        assert status == 200 and done["status"] == "succeeded", done
        status, detail = server.request("GET", f"/v1/runs/{run_id}")
        assert [s["status"] for s in detail["steps"]] == ["succeeded"] * 4
        assert detail["output"] == {"step": "third", "label": "alice"}
    finally:
        server.stop()
    lines = counts.read_text().splitlines()
    assert sorted(line.split()[0] for line in lines) == ["first", "second", "third"], lines
    assert all(line.split()[1] == "1" for line in lines)


INFLIGHT = """
name: inflight
steps:
  - id: first
    task: test.count
    input: {path: "{{ input.path }}"}
  - id: slow
    task: test.hang
    input: {path: "{{ input.path }}"}
  - id: last
    task: test.count
    input: {path: "{{ input.path }}"}
"""


def test_sigkill_during_a_handler_reruns_that_attempt_with_the_same_idempotency_key(tmp_path):
    server, counts, run_id = start_server(tmp_path, "inflight", INFLIGHT, BATON_TEST_HANG="1")
    try:
        server.wait_for(lambda: counts.exists() and "slow" in counts.read_text(), "the slow step to start")
        server.kill()
        server.env["BATON_TEST_HANG"] = "0"
        server.start()
        status, done = server.request("GET", f"/v1/runs/{run_id}/wait?timeout=15", timeout_s=20)
        assert status == 200 and done["status"] == "succeeded", done
    finally:
        server.stop()
    calls = [line.split() for line in counts.read_text().splitlines()]
    assert [c[0] for c in calls] == ["first", "slow", "slow", "last"]
    assert calls[1] == calls[2]  # same attempt, same idempotency key: the handler can dedupe
    assert calls[1][2] == f"{run_id}:slow:1"


GRACEFUL = """
name: graceful
steps:
  - id: nap
    task: sleep
    input: {seconds: 0.5}
  - id: after
    task: test.count
    input: {path: "{{ input.path }}"}
"""


def test_sigterm_lets_running_steps_finish_and_commits_them(tmp_path):
    server, counts, run_id = start_server(tmp_path, "graceful", GRACEFUL)
    try:
        assert server.request("GET", f"/v1/runs/{run_id}")[1]["steps"][0]["status"] == "running"
        assert server.stop() == 0  # SIGTERM: the 0.5 s step finishes inside the grace period
        server.start()
        status, done = server.request("GET", f"/v1/runs/{run_id}/wait?timeout=15", timeout_s=20)
        assert done["status"] == "succeeded", done
        nap = server.request("GET", f"/v1/runs/{run_id}")[1]["steps"][0]
        assert nap["attempt"] == 1 and nap["status"] == "succeeded"  # finished before exit, not re-run
    finally:
        server.stop()
    assert len(counts.read_text().splitlines()) == 1
