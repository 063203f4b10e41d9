"""Remote task workers: a real nats-server, the server and `baton worker` processes.

The server loads no handler modules: the queue steps' handlers exist only in the
workers (tests/worker_handlers.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats
import orjson
import pytest

from tests.serverproc import REPO, ChildProcess, ServerProcess

pytestmark = pytest.mark.integration

WAIT_S = 20.0


class WorkerProcess(ChildProcess):
    """`python -m server worker`, its log in a file; ready once it says it serves its queues."""

    def __init__(self, tmp_path: Path, name: str, nats_url: str, queue: str = "gpu") -> None:
        self.log = tmp_path / f"{name}.log"
        config = tmp_path / "empty-config.yaml"
        config.write_text("{}\n")
        self.command = [sys.executable, "-m", "server", "worker", "--queue", queue,
                        "--handlers", "tests.worker_handlers", "--nats-url", nats_url]
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("BATON_")},
                    "PYTHONPATH": str(REPO), "BATON_CONFIG": str(config), "BATON_LOG_LEVEL": "INFO",
                    "BATON_WORKER__NAME": name}
        self.proc: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            if "serving queues" in self.log.read_text(errors="replace"):
                return self
            time.sleep(0.05)
        raise TimeoutError(f"worker not ready within {WAIT_S}s:\n{self.log.read_text()[-3000:]}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def start_server(tmp_path: Path, nats_url: str, definition: str) -> ServerProcess:
    wf = tmp_path / "wf"
    wf.mkdir()
    (wf / "remote.yaml").write_text(definition)
    server = ServerProcess(tmp_path / "data", wf, [], BATON_NATS_URL=nats_url)
    server.start()
    return server


def start_run(server: ServerProcess, input: dict) -> str:
    status, run = server.request("POST", "/v1/workflows/remote/runs", {"input": input})
    assert status == 201, run
    return run["run_id"]


def finished(server: ServerProcess, run_id: str) -> dict:
    status, done = server.request("GET", f"/v1/runs/{run_id}/wait?timeout={WAIT_S:g}", timeout_s=WAIT_S + 5)
    assert status == 200, done
    return done


def history(server: ServerProcess, run_id: str) -> list[dict]:
    return server.request("GET", f"/v1/runs/{run_id}/history")[1]["events"]


def publish(nats_url: str, subject: str, body: dict) -> None:
    """Publish into a stream from outside, like a worker would."""

    async def go() -> None:
        nc = await nats.connect(nats_url)
        try:
            await nc.jetstream().publish(subject, orjson.dumps(body))
        finally:
            await nc.close()

    asyncio.run(go())


ECHO = """
name: remote
steps:
  - id: shout
    task: remote.echo
    queue: gpu
    input: {text: "{{ input.text }}"}
  - id: refuse
    task: remote.decline
    queue: gpu
    when: "input.refuse"
    input: {reason: "{{ input.text }}"}
"""


def test_a_worker_in_another_process_runs_the_step_and_reports_its_output_and_errors(tmp_path, nats_server):
    server = start_server(tmp_path, nats_server.url, ECHO)
    worker = WorkerProcess(tmp_path, "w1", nats_server.url).start()
    try:
        run_id = start_run(server, {"text": "hello", "refuse": False})
        assert finished(server, run_id)["status"] == "succeeded"
        detail = server.request("GET", f"/v1/runs/{run_id}")[1]
        assert detail["output"] == {"text": "HELLO", "pid": worker.pid, "task_id": f"{run_id}:shout:1", "step": "shout"}
        rows = history(server, run_id)
        scheduled = next(r for r in rows if r["type"] == "step.scheduled")
        assert scheduled["data"]["queue"] == "gpu"
        started = [r for r in rows if r["type"] == "task.started"]
        assert [(r["key"], r["data"]["worker"]) for r in started] == [("shout", "w1")]
        assert not [r for r in rows if r["type"] == "task.heartbeat"]

        # a handler's error comes back in the same shape as from an in-process handler
        run_id = start_run(server, {"text": "no", "refuse": True})
        assert finished(server, run_id)["status"] == "failed"
        error = server.request("GET", f"/v1/runs/{run_id}")[1]["error"]
        assert error == {"type": "Declined", "message": "no", "retryable": False, "details": {"reason": "no"}, "step": "refuse"}
    finally:
        assert worker.stop() == 0  # SIGTERM with nothing running: a clean exit
        server.stop()


def remote_render(task: str) -> str:
    """One remote step on queue gpu with a 1 s heartbeat and quick retries."""
    return f"""
name: remote
steps:
  - id: render
    task: {task}
    queue: gpu
    heartbeat: 1s
    retry: {{max_attempts: 3, initial_delay: 100ms, jitter: 0}}
    input: {{log: "{{{{ input.log }}}}", release: "{{{{ input.release }}}}"}}
"""


STUCK = remote_render("remote.stuck_first")


def test_a_killed_worker_is_noticed_by_its_heartbeats_and_its_late_result_is_ignored(tmp_path, nats_server):
    server = start_server(tmp_path, nats_server.url, STUCK)
    workers = [WorkerProcess(tmp_path, f"w{i}", nats_server.url).start() for i in (1, 2)]
    calls, release = tmp_path / "calls.txt", tmp_path / "release"
    try:
        run_id = start_run(server, {"log": str(calls), "release": str(release)})
        lines = server.wait_for(lambda: calls.exists() and calls.read_text().splitlines(), "attempt 1 to start")
        pid, attempt, first_task = lines[0].split()
        assert attempt == "1"
        doomed = next(w for w in workers if w.pid == int(pid))
        survivor = next(w for w in workers if w is not doomed)
        doomed.kill()

        # after the heartbeat timeout, attempt 2 runs on the other worker
        server.wait_for(lambda: len(calls.read_text().splitlines()) == 2, "attempt 2 to start", timeout_s=WAIT_S)
        pid2, attempt2, second_task = calls.read_text().splitlines()[1].split()
        assert (int(pid2), attempt2) == (survivor.pid, "2")
        rows = history(server, run_id)
        retrying = next(r for r in rows if r["type"] == "step.retrying")
        assert retrying["data"]["attempt"] == 1 and retrying["data"]["error"]["type"] == "HeartbeatTimeout"

        # the killed attempt's result arrives late (as from a worker that was only cut off): ignored
        before = server.request("GET", f"/v1/runs/{run_id}")[1]
        publish(nats_server.url, "baton.results.gpu",
                {"task_id": first_task, "run_id": run_id, "type": "succeeded", "output": "stale"})
        server.wait_for(lambda: any(r["type"] == "task.ignored" and r["data"]["task_id"] == first_task
                                    for r in history(server, run_id)), "the late result to be recorded as ignored")
        after = server.request("GET", f"/v1/runs/{run_id}")[1]
        assert after["status"] == "running" and after["steps"] == before["steps"]
        assert after["steps"][0]["attempt"] == 2

        release.touch()
        assert finished(server, run_id)["status"] == "succeeded"
        detail = server.request("GET", f"/v1/runs/{run_id}")[1]
        assert detail["output"] == {"pid": survivor.pid, "attempt": 2}
        started = [(r["data"]["task_id"], r["data"]["worker"]) for r in history(server, run_id) if r["type"] == "task.started"]
        assert started == [(first_task, f"w{workers.index(doomed) + 1}"), (second_task, f"w{workers.index(survivor) + 1}")]
    finally:
        for w in workers:
            w.stop()
        server.stop()


def stream_messages(nats_url: str, stream: str) -> int:
    async def go() -> int:
        nc = await nats.connect(nats_url)
        try:
            return (await nc.jetstream().stream_info(stream)).state.messages
        finally:
            await nc.close()

    return asyncio.run(go())


PATIENT = remote_render("remote.until_released")


def test_results_wait_in_nats_while_baton_is_down_and_a_restart_does_not_fail_started_attempts(tmp_path, nats_server):
    server = start_server(tmp_path, nats_server.url, PATIENT)
    worker = WorkerProcess(tmp_path, "w1", nats_server.url).start()
    calls, release = tmp_path / "calls.txt", tmp_path / "release"
    try:
        run_id = start_run(server, {"log": str(calls), "release": str(release)})
        server.wait_for(lambda: calls.exists() and calls.read_text(), "attempt 1 to start")
        server.kill()
        # Baton stays down for longer than the heartbeat: 1s of heartbeats (3 a second) pile up
        server.wait_for(lambda: stream_messages(nats_server.url, "BATON_RESULTS") >= 4, "heartbeats to queue up")
        release.touch()
        server.wait_for(lambda: "succeeded" in str(_last_result(nats_server.url)), "the result to wait in NATS")

        server.start()
        assert finished(server, run_id)["status"] == "succeeded"
        detail = server.request("GET", f"/v1/runs/{run_id}")[1]
        assert detail["output"] == {"pid": worker.pid, "attempt": 1}
        assert not [r for r in history(server, run_id) if r["type"] == "step.retrying"]
        assert len(calls.read_text().splitlines()) == 1  # not sent again after the restart
    finally:
        worker.stop()
        server.stop()


def _last_result(nats_url: str) -> bytes:
    async def go() -> bytes:
        nc = await nats.connect(nats_url)
        try:
            msg = await nc.jetstream().get_last_msg("BATON_RESULTS", "baton.results.gpu")
            return msg.data
        finally:
            await nc.close()

    return asyncio.run(go())


def test_sigterm_lets_a_running_task_finish_and_report_before_the_worker_exits(tmp_path, nats_server):
    server = start_server(tmp_path, nats_server.url, PATIENT)
    worker = WorkerProcess(tmp_path, "w1", nats_server.url).start()
    calls, release = tmp_path / "calls.txt", tmp_path / "release"
    try:
        run_id = start_run(server, {"log": str(calls), "release": str(release)})
        server.wait_for(lambda: calls.exists() and calls.read_text(), "attempt 1 to start")
        worker.proc.send_signal(signal.SIGTERM)
        server.wait_for(lambda: "shutting down" in worker.log.read_text(), "the worker to begin its shutdown")
        release.touch()
        assert worker.proc.wait(timeout=WAIT_S) == 0
        assert finished(server, run_id)["status"] == "succeeded"
        assert server.request("GET", f"/v1/runs/{run_id}")[1]["output"]["attempt"] == 1
    finally:
        worker.stop()
        server.stop()


def test_the_worker_command_needs_a_nats_url_and_valid_queue_names(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from server.cli import app

    config = tmp_path / "baton.yaml"
    config.write_text("{}\n")
    monkeypatch.delenv("BATON_NATS_URL", raising=False)
    result = CliRunner().invoke(app, ["worker", "--queue", "gpu", "--config", str(config)])
    assert result.exit_code == 2 and "--nats-url or set BATON_NATS_URL" in result.output
    result = CliRunner().invoke(app, ["worker", "--queue", "a.b", "--nats-url", "nats://127.0.0.1:1", "--config", str(config)])
    assert result.exit_code == 2 and "a queue name is 1-64 letters" in result.output
