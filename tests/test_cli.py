"""The `baton` command: offline commands in-process, client commands against a real `baton serve`."""

from __future__ import annotations

import csv
import io
import re
import shutil
import sys
import threading
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from server.cli import app
from server.client import BatonClient
from tests.sample_workflows import APPROVAL, GREET
from tests.serverproc import ServerProcess, free_port

SERVER_START_S = 30.0  # a cold start imports the world; generous, but bounded


BROKEN = """\
name: broken
steps:
  - id: boom
    task: fail
    input: {message: kaput, retryable: false}
"""

BAD = """\
name: bad
steps:
  - id: first
    task: echo
  - id: second
    task: no.such.handler
    needs: [frist]
"""

runner = CliRunner()


def baton(*args: str, **kwargs):
    return runner.invoke(app, list(args), **kwargs)


def write_workflows(root: Path) -> Path:
    wf = root / "wf"
    wf.mkdir()
    (wf / "greet.yaml").write_text(GREET)
    (wf / "approval.yaml").write_text(APPROVAL)
    (wf / "broken.yaml").write_text(BROKEN)
    return wf




@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no repository config/baton.yaml
    for name in ("BATON_CONFIG", "BATON_URL", "BATON_WORKFLOWS", "BATON_HANDLER_MODULES"):
        monkeypatch.delenv(name, raising=False)


# --- offline commands -------------------------------------------------------------------


def test_validate_a_good_directory(tmp_path):
    wf = write_workflows(tmp_path)
    result = baton("validate", str(wf))
    assert result.exit_code == 0, result.output
    assert re.search(r"greet\s+│\s+2\s+│\s+2\s+│", result.stdout)
    assert "3 workflow(s) OK" in result.stdout


def test_validate_defaults_to_the_settings_workflows(tmp_path, monkeypatch):
    wf = write_workflows(tmp_path)
    monkeypatch.setenv("BATON_WORKFLOWS", orjson.dumps([str(wf)]).decode())
    result = baton("validate")
    assert result.exit_code == 0, result.output
    assert "approval" in result.stdout


def test_validate_a_bad_file_prints_file_line_and_exits_1(tmp_path):
    write_workflows(tmp_path)
    bad = tmp_path / "wf" / "bad.yaml"
    bad.write_text(BAD)
    result = baton("validate", str(tmp_path / "wf"))
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert any(line.startswith(f"{bad}:6: steps[1].task: ") for line in lines), lines
    assert any(line.startswith(f"{bad}:7: steps[1].needs[0]: ") for line in lines), lines
    assert result.stdout == ""


def test_schema_is_json_schema():
    result = baton("schema")
    assert result.exit_code == 0
    schema = orjson.loads(result.stdout)
    assert schema["$schema"].startswith("https://json-schema.org/") and "steps" in schema["properties"]
    assert result.stdout.startswith('{\n  "')  # indented by two


def test_bad_json_options_exit_2_before_any_request():
    result = baton("start", "greet", "--input", "{name: 1}", "--url", "http://127.0.0.1:9")
    assert result.exit_code == 2
    assert "--input" in result.stderr and "not valid JSON" in result.stderr
    result = baton("signal", "r1", "approve", "--data", "[1,", "--url", "http://127.0.0.1:9")
    assert result.exit_code == 2 and "--data" in result.stderr


def test_unreachable_server_says_what_to_do():
    url = f"http://127.0.0.1:{free_port()}"
    result = baton("runs", "--url", url)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: cannot reach Baton at {url}: is the server running? (baton dev)"


# --- against a real server --------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`baton serve` through the installed console script, run from outside the repository."""
    root = tmp_path_factory.mktemp("server")
    wf = write_workflows(root)
    script = shutil.which("baton", path=str(Path(sys.executable).parent))
    command = [script, "serve"] if script else [sys.executable, "-m", "server", "serve"]
    proc = ServerProcess(root / "data", wf, command=command, cwd=root)
    proc.start(timeout_s=SERVER_START_S)
    try:
        yield proc.url
    finally:
        proc.stop()


def start_json(server: str, *args: str) -> dict:
    result = baton("start", *args, "--url", server, "--json")
    assert result.exit_code == 0, result.output
    return orjson.loads(result.stdout)


def wait_for_gate(server: str, run_id: str) -> None:
    client = BatonClient(server)
    for _ in range(100):
        if "approve" in client.run(run_id)["waiting_for"]:
            return
        client.wait(run_id, 0.05)
    raise AssertionError(f"run {run_id} never waited for approve")


@pytest.mark.integration
def test_start_and_wait_until_succeeded(server):
    result = baton("start", "greet", "--input", '{"name": "ada"}', "--wait", "--timeout", "20", "--url", server)
    assert result.exit_code == 0, result.output
    run_id = re.search(r"started run (\w+) \(greet@2\)", result.stdout).group(1)
    assert f"run {run_id} succeeded" in result.stdout


@pytest.mark.integration
def test_start_wait_of_a_failing_run_exits_1_and_says_why(server):
    result = baton("start", "broken", "--wait", "--url", server)
    assert result.exit_code == 1
    assert re.search(r"run \w+ failed: .*kaput", result.stdout), result.stdout


@pytest.mark.integration
def test_start_reads_input_from_a_file(server, tmp_path):
    (tmp_path / "in.json").write_text('{"name": "grace"}')
    run = start_json(server, "greet", "--input-file", str(tmp_path / "in.json"), "--wait")
    assert run["status"] == "succeeded"
    detail = BatonClient(server).run(run["run_id"])
    assert detail["steps"][-1]["output"] == {"loud": "HELLO GRACE"}


@pytest.mark.integration
def test_server_errors_print_message_and_field(server):
    result = baton("start", "greet", "--input", '{"name": 7}', "--url", server)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and result.stderr.rstrip().endswith("(field: input.name)")
    result = baton("start", "nope", "--url", server)
    assert result.exit_code == 1 and "unknown workflow 'nope'" in result.stderr


@pytest.mark.integration
def test_same_workflow_id_returns_the_open_run(server):
    first = start_json(server, "approval", "--workflow-id", "cli-dup")
    result = baton("start", "approval", "--workflow-id", "cli-dup", "--url", server)
    assert result.exit_code == 0
    assert f"already open for workflow_id 'cli-dup': run {first['run_id']}" in result.stdout
    baton("cancel", first["run_id"], "--url", server)


@pytest.mark.integration
def test_signal_while_show_follows(server):
    run_id = start_json(server, "approval")["run_id"]
    wait_for_gate(server, run_id)
    shown = baton("show", run_id, "--url", server)
    assert shown.exit_code == 0
    assert re.search(r"waiting for\s+approve", shown.stdout) and "wait_for_signal" in shown.stdout

    wrong = baton("signal", run_id, "reject", "--url", server)
    assert wrong.exit_code == 1 and wrong.stderr.rstrip().endswith("(field: name)")

    # Approve from another thread while `show --follow` is polling; it returns when the run ends.
    sender = threading.Timer(0.3, BatonClient(server).signal, (run_id, "approve", {"by": "alice"}))
    sender.start()
    try:
        followed = baton("show", run_id, "--follow", "--url", server)
    finally:
        sender.join()
    assert followed.exit_code == 0, followed.output
    assert re.search(r"status\s+succeeded \(attempt 1\)", followed.stdout)
    assert re.search(r"done\s+│\s+task\s+│\s+succeeded", followed.stdout)

    again = baton("signal", run_id, "approve", "--data", '{"by": "bob"}', "--url", server)
    assert again.exit_code == 1 and "already succeeded" in again.stderr


@pytest.mark.integration
def test_signal_command_delivers(server):
    run_id = start_json(server, "approval")["run_id"]
    wait_for_gate(server, run_id)
    result = baton("signal", run_id, "approve", "--data", '{"by": "carol"}', "--url", server)
    assert result.exit_code == 0 and f"signal approve delivered to run {run_id}" in result.stdout
    assert BatonClient(server).wait(run_id, 10)["status"] == "succeeded"


@pytest.mark.integration
def test_history_as_table_json_and_csv(server):
    run_id = start_json(server, "greet", "--input", '{"name": "x"}', "--wait")["run_id"]
    as_json = baton("history", run_id, "--format", "json", "--url", server)
    events = orjson.loads(as_json.stdout)
    assert events[0]["type"] == "run.started" and events[-1]["type"] == "run.succeeded"

    as_csv = baton("history", run_id, "--format", "csv", "--url", server)
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [(int(r["seq"]), r["type"]) for r in rows] == [(e["seq"], e["type"]) for e in events]
    assert [orjson.loads(r["data"]) for r in rows] == [e["data"] for e in events]

    table = baton("history", run_id, "--url", server)
    assert table.exit_code == 0 and "run.succeeded" in table.stdout
    bad = baton("history", run_id, "--format", "xml", "--url", server)
    assert bad.exit_code == 2


@pytest.mark.integration
def test_runs_lists_and_filters(server):
    run_id = start_json(server, "greet", "--input", '{"name": "list"}', "--wait")["run_id"]
    table = baton("runs", "--workflow", "greet", "--url", server)
    assert table.exit_code == 0 and run_id in table.stdout
    listed = orjson.loads(baton("runs", "--status", "succeeded", "--limit", "500", "--json", "--url", server).stdout)
    assert run_id in [r["run_id"] for r in listed["runs"]]
    assert all(r["status"] == "succeeded" for r in listed["runs"])
    one = orjson.loads(baton("runs", "--limit", "1", "--json", "--url", server).stdout)
    assert len(one["runs"]) == 1 and one["next_cursor"]
    bad = baton("runs", "--status", "sleepy", "--url", server)
    assert bad.exit_code == 1 and bad.stderr.rstrip().endswith("(field: status)")


@pytest.mark.integration
def test_cancel_then_retry(server):
    run_id = start_json(server, "approval")["run_id"]
    wait_for_gate(server, run_id)
    busy = baton("retry", run_id, "--url", server)
    assert busy.exit_code == 1 and "only failed, compensated or cancelled" in busy.stderr
    cancelled = baton("cancel", run_id, "--reason", "not today", "--url", server)
    assert cancelled.exit_code == 0, cancelled.output
    assert BatonClient(server).wait(run_id, 10)["status"] == "cancelled"
    retried = baton("retry", run_id, "--url", server)
    assert retried.exit_code == 0 and "(attempt 2)" in retried.stdout
    baton("cancel", run_id, "--url", server)


@pytest.mark.integration
def test_workflows_and_url_from_the_environment(server):
    result = baton("workflows", env={"BATON_URL": server})
    assert result.exit_code == 0, result.output
    assert re.search(r"greet\s+│\s+2\s+│\s+2\s+│", result.stdout) and "broken" in result.stdout
