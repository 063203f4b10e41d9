"""Structured logs: the identities a step's lines carry (from the handler's own logger and
from any library it calls), redaction, and the formats `baton serve`, `baton worker` and
`baton dev` write.

The handlers below are also served by the processes these tests start
(`handler_modules: [tests.test_logs]`, `baton worker --handlers tests.test_logs`)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from handlers import Context, handler
from server.api.auth import new_token
from server.app import open_runtime
from server.errors import ConfigError
from server.settings import load_settings
from server.telemetry import logs
from server.telemetry.ids import run_trace_id, task_span_id
from tests.inproc import api_client, call
from tests.serverproc import ServerProcess
from tests.test_workers import WorkerProcess

LIBRARY = "some.lib"  # a library the handler calls, logging through stdlib logging
WAIT_S = 20.0


@handler("test.logs.talk")
async def talk(ctx, fail_attempts: int = 0):
    ctx.logger.info("charging", extra={"order": "A-7"})
    logging.getLogger(LIBRARY).info("library call with api_key=%s", "k-live-123456")

    async def background() -> None:  # a task the handler starts inherits the attempt's context
        logging.getLogger(LIBRARY).info("from a task of the handler")

    await asyncio.create_task(background())
    if ctx.attempt <= fail_attempts:
        raise RuntimeError("flaky")
    return {"ok": True}


TALKY = """
name: talky
steps:
  - id: first
    task: test.logs.talk
    input: {fail_attempts: "{{ input.fail | default(0) }}"}
    retry: {max_attempts: 2, initial_delay: 0.01, jitter: 0}
  - id: second
    task: test.logs.talk
"""

HOOKED = """
name: hooked
triggers:
  - webhook: {path: orders, secret: {env: TEST_LOGS_HOOK_SECRET}, signature: hmac-sha256}
steps:
  - id: only
    task: test.logs.talk
"""
HOOK_SECRET = "hook-secret-7f3a9c"

REMOTE = """
name: talky
steps:
  - id: far
    task: test.logs.talk
    queue: logs
"""

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_TRACEPARENT = f"00-{CALLER_TRACE}-00f067aa0ba902b7-01"
STEP_KEYS = {"trace_id", "span_id", "workflow", "run_id", "step_id", "task_id", "attempt"}


@pytest.fixture
def settings(tmp_path, monkeypatch):
    wf = tmp_path / "wf"
    wf.mkdir()
    (wf / "talky.yaml").write_text(TALKY)
    (wf / "hooked.yaml").write_text(HOOKED)
    (tmp_path / "empty.yaml").write_text("{}\n")
    monkeypatch.setenv("BATON_CONFIG", str(tmp_path / "empty.yaml"))
    return load_settings(data_dir=tmp_path / "data", workflows=[wf], handler_modules=["tests.test_logs"],
                         nats={"enabled": False})


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """What the root logger writes in the JSON format while the test runs."""
    stream = io.StringIO()
    handler = logs.make_handler("json", stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def parsed(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def step_lines(lines: list[dict], run_id: str) -> list[dict]:
    return [line for line in lines if line["logger"] in ("baton.handler", LIBRARY) and line.get("run_id") == run_id]


# --- in process -------------------------------------------------------------------------


async def test_every_line_inside_a_step_carries_the_run_step_and_attempt(settings, json_lines):
    async with open_runtime(settings) as rt:
        run, _ = await rt.start_run("talky", {"fail": 1})
        assert (await rt.wait(run["run_id"], 5))["status"] == "succeeded"
    run_id = run["run_id"]
    lines = parsed(json_lines)
    inside = step_lines(lines, run_id)
    # attempt 1 and 2 of `first`, then `second`: three lines each (handler, library, library's task)
    assert [(line["step_id"], line["attempt"]) for line in inside] == [
        ("first", 1)] * 3 + [("first", 2)] * 3 + [("second", 1)] * 3
    for line in inside:
        task_id = f"{run_id}:{line['step_id']}:{line['attempt']}"
        assert line["task_id"] == task_id
        assert line["span_id"] == task_span_id(task_id)
        assert line["trace_id"] == run_trace_id(run_id)
        assert line["workflow"] == "talky" and line["level"] == "INFO"
        assert line["ts"].endswith("Z") and "T" in line["ts"]
    handler_line = next(line for line in inside if line["logger"] == "baton.handler")
    assert handler_line["message"] == "charging" and handler_line["order"] == "A-7"  # the call's own extra
    library_line = next(line for line in inside if line["logger"] == LIBRARY)
    assert library_line["message"] == "library call with api_key=[redacted]"
    # lines outside a step carry no step fields
    started = next(line for line in lines if line["message"].startswith("runtime started"))
    assert not STEP_KEYS & started.keys()


async def test_a_run_started_with_a_traceparent_logs_in_the_callers_trace(settings, json_lines):
    async with open_runtime(settings) as rt:
        run, _ = await rt.start_run("talky", {}, event={"traceparent": CALLER_TRACEPARENT})
        assert (await rt.wait(run["run_id"], 5))["status"] == "succeeded"
    inside = step_lines(parsed(json_lines), run["run_id"])
    assert len(inside) == 6 and {line["trace_id"] for line in inside} == {CALLER_TRACE}
    assert len({line["span_id"] for line in inside}) == 2  # one span per attempt


async def test_api_lines_carry_the_request_id_and_webhook_secrets_are_masked(settings, json_lines, monkeypatch):
    monkeypatch.setenv("TEST_LOGS_HOOK_SECRET", HOOK_SECRET)
    async with api_client(settings) as client:
        await call(client, "POST", "/hooks/orders", 401, data=b"{}",
                   headers={"X-Request-Id": "req-42", "Content-Type": "application/json"})
    refused = next(line for line in parsed(json_lines) if "refused" in line["message"])
    assert refused["request_id"] == "req-42" and not STEP_KEYS & refused.keys()
    assert logs.redact(f"secret {HOOK_SECRET} leaked") == "secret [redacted] leaked"  # read at start-up, registered


async def test_the_context_is_per_attempt_and_ends_with_it():
    stream = io.StringIO()
    logger = _private_logger(stream, "json")
    ctx_a = _ctx("r1", "a")
    ctx_b = _ctx("r2", "b")

    async def attempt(ctx, trace_id: str) -> None:
        with logs.attempt_context(ctx, trace_id):
            await asyncio.sleep(0)  # the two attempts interleave
            logger.info("in %s", ctx.step_id)

    await asyncio.gather(attempt(ctx_a, "1" * 32), attempt(ctx_b, "2" * 32))
    logger.info("after")
    a, b, after = parsed(stream)
    assert (a["run_id"], a["step_id"], a["trace_id"]) == ("r1", "a", "1" * 32)
    assert (b["run_id"], b["step_id"], b["trace_id"]) == ("r2", "b", "2" * 32)
    assert not STEP_KEYS & after.keys()


# --- redaction --------------------------------------------------------------------------

TOKEN = new_token()


@pytest.mark.parametrize("text, expected", [
    (f"Authorization: Bearer {TOKEN}", "Authorization: [redacted]"),
    (f"calling with {TOKEN} now", "calling with bt_[redacted] now"),
    ("Basic dXNlcjpwYXNzd29yZA==", "Basic [redacted]"),
    ("GET /v1/approvals/eyJhcHByb3ZhbCI6MX0.Zk3aBc.sig-_x failed", "GET /v1/approvals/[redacted] failed"),
    ('{"password": "hunter 2", "user": "bob"}', '{"password": "[redacted]", "user": "bob"}'),
    ("{'X-Api-Key': 'k123', 'Accept': 'json'}", "{'X-Api-Key': '[redacted]', 'Accept': 'json'}"),
    ("https://h/p?token=abc&x=1, webhook_secret: s3cr3t", "https://h/p?token=[redacted]&x=1, webhook_secret: [redacted]"),
    ("nats://alice:pa55word@nats:4222", "nats://alice:[redacted]@nats:4222"),
    # ordinary lines stay as they are
    ("GET /v1/approvals failed", "GET /v1/approvals failed"),
    ("a bearer token is missing", "a bearer token is missing"),
    ("task r1:charge:2 passed its deadline", "task r1:charge:2 passed its deadline"),
])
def test_credentials_in_text_are_masked(text, expected):
    assert logs.redact(text) == expected


def test_registered_secret_values_are_masked_wherever_they_appear():
    logs.register_secrets("whsec-0f1e2d3c", "abc", None)  # too short to mask: it would hit ordinary words
    assert logs.redact("signed with whsec-0f1e2d3c!") == "signed with [redacted]!"
    assert logs.redact("abc") == "abc"


def test_messages_extra_fields_and_tracebacks_are_masked():
    stream = io.StringIO()
    logger = _private_logger(stream, "json")
    try:
        raise ValueError(f"refused {TOKEN}")
    except ValueError:
        logger.exception("call with %s failed", f"Bearer {TOKEN}",
                         extra={"headers": {"Authorization": "Bearer x", "Accept": "json"}, "password": "pw",
                                "note": f"token={TOKEN}", "count": 3})
    line = parsed(stream)[0]
    assert line["message"] == "call with Bearer [redacted] failed"
    assert line["headers"] == {"Authorization": "[redacted]", "Accept": "json"}
    assert line["password"] == "[redacted]" and line["note"] == "token=[redacted]" and line["count"] == 3
    assert "ValueError: refused bt_[redacted]" in line["exc_info"]
    assert TOKEN not in stream.getvalue()


def test_a_bad_format_string_is_reported_by_logging_not_raised_by_the_filter(capsys):
    stream = io.StringIO()
    logger = _private_logger(stream, "json")
    logger.info("%d items", "not a number")  # the caller goes on
    assert "--- Logging error ---" in capsys.readouterr().err and stream.getvalue() == ""


# --- formats ----------------------------------------------------------------------------


def test_the_console_format_reads_as_a_sentence_with_the_ids_after_it():
    stream = io.StringIO()
    logger = _private_logger(stream, "console")
    with logs.attempt_context(_ctx("r1", "charge"), "1" * 32):
        logger.warning("card declined", extra={"reason": "insufficient funds"})
    text = stream.getvalue()
    assert " WARNING test.logs.private: card declined  " in text
    assert 'workflow=wf run=r1 step=charge attempt=1 reason="insufficient funds"' in text
    assert "trace_id" not in text and not text.lstrip().startswith("{")


def test_setup_replaces_its_own_handler_only():
    root = logging.getLogger()
    level, before = root.level, list(root.handlers)
    try:
        first = logs.setup("INFO", "json", io.StringIO())
        second = logs.setup("WARNING", "console", io.StringIO())
        assert first not in root.handlers and second in root.handlers
        assert [h for h in root.handlers if h is not second] == before
        assert root.level == logging.WARNING
    finally:
        root.removeHandler(second)
        root.setLevel(level)


def test_the_setting_accepts_only_known_formats(tmp_path, monkeypatch):
    (tmp_path / "empty.yaml").write_text("{}\n")
    monkeypatch.setenv("BATON_CONFIG", str(tmp_path / "empty.yaml"))
    assert load_settings(log_format="console").log_format == "console"
    assert load_settings().log_format is None  # json for serve and worker, console for dev
    with pytest.raises(ConfigError, match="log_format"):
        load_settings(log_format="xml")


# --- real processes ---------------------------------------------------------------------


def _server(tmp_path, command: str, **env: str) -> ServerProcess:
    wf = tmp_path / "wf"
    wf.mkdir(exist_ok=True)
    (wf / "talky.yaml").write_text(env.pop("definition", TALKY))
    return ServerProcess(tmp_path / "data", wf, ["tests.test_logs"], command=[sys.executable, "-m", "server", command],
                         BATON_LOG_LEVEL="INFO", **env)


def _run(server: ServerProcess) -> str:
    status, run = server.request("POST", "/v1/workflows/talky/runs", {"input": {}})
    assert status == 201, run
    status, done = server.request("GET", f"/v1/runs/{run['run_id']}/wait?timeout={WAIT_S:g}", timeout_s=WAIT_S + 5)
    assert status == 200 and done["status"] == "succeeded", done
    return run["run_id"]


@pytest.mark.integration
def test_baton_serve_writes_json_lines(tmp_path):
    server = _server(tmp_path, "serve", BATON_NATS__ENABLED="false")
    server.start()
    try:
        run_id = _run(server)
    finally:
        assert server.stop() == 0
    lines = [json.loads(line) for line in server.log.read_text().splitlines()]  # every line is one object
    assert any(line["message"].startswith("Baton (serve) listening on") for line in lines)
    inside = step_lines(lines, run_id)
    assert {(line["step_id"], line["trace_id"]) for line in inside} == {
        ("first", run_trace_id(run_id)), ("second", run_trace_id(run_id))}
    assert all(line["span_id"] == task_span_id(line["task_id"]) for line in inside)


@pytest.mark.integration
def test_baton_dev_writes_readable_lines(tmp_path):
    server = _server(tmp_path, "dev", BATON_NATS__ENABLED="false")
    server.start()
    try:
        run_id = _run(server)
    finally:
        server.stop()
    text = server.log.read_text()
    assert " INFO baton: Baton (dev) listening on http://127.0.0.1:" in text
    assert f"run={run_id} step=first attempt=1" in text
    assert not any(line.startswith("{") for line in text.splitlines())


@pytest.mark.integration
def test_baton_worker_writes_json_lines_in_the_runs_trace(tmp_path, nats_server):
    server = _server(tmp_path, "serve", definition=REMOTE, BATON_NATS_URL=nats_server.url, BATON_HANDLER_MODULES="[]")
    server.start()
    worker = WorkerProcess(tmp_path, "w1", nats_server.url, queue="logs")
    worker.command[worker.command.index("tests.worker_handlers")] = "tests.test_logs"
    worker.start()
    try:
        run_id = _run(server)
    finally:
        assert worker.stop() == 0
        server.stop()
    lines = [json.loads(line) for line in worker.log.read_text().splitlines()]
    assert any("serving queues" in line["message"] for line in lines)
    inside = step_lines(lines, run_id)
    assert len(inside) == 3
    task_id = f"{run_id}:far:1"
    for line in inside:
        assert (line["trace_id"], line["span_id"], line["task_id"]) == (run_trace_id(run_id), task_span_id(task_id), task_id)
        assert (line["workflow"], line["step_id"], line["attempt"]) == ("talky", "far", 1)


# --- helpers ----------------------------------------------------------------------------


def _private_logger(stream: io.StringIO, fmt: logs.LogFormat) -> logging.Logger:
    """A logger of the test's own with Baton's handler, not the root's."""
    logger = logging.getLogger("test.logs.private")
    for old in list(logger.handlers):
        logger.removeHandler(old)
    logger.addHandler(logs.make_handler(fmt, stream))
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def _ctx(run_id: str, step_id: str) -> Context:
    task_id = f"{run_id}:{step_id}:1"
    return Context(workflow="wf", version="1", workflow_id=None, run_id=run_id, step_id=step_id, task_id=task_id,
                   attempt=1, idempotency_key=task_id)
