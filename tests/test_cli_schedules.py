"""`baton schedules`, `baton calendars` and `baton validate` with schedules: the client
commands against one real `baton serve` for the module, the offline ones in-process;
and the README's "Replace your crontab" example, loaded and compiled as the server would."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import orjson
import pytest
from ruamel.yaml import YAML
from typer.testing import CliRunner

from server.cli import app
from server.client import BatonClient
from tests.serverproc import REPO, ServerProcess

SERVER_START_S = 30.0  # a cold start imports the world; generous, but bounded

CALENDARS = """\
calendars:
  month-end-close:
    timezone: Europe/Berlin
    last_business_days: 2
"""

# 19:00 on weekdays in Berlin, from 2099 on: the server runs on the real clock, and a
# real fire at 19:00 Berlin time on a weekday would join the fire records (and become
# the "last run") between a test's commands
NIGHTLY = """\
name: dev-envs
triggers:
  - cron:
      name: stop-dev-envs-test
      schedule: "0 19 * * MON-FRI"
      timezone: Europe/Berlin
      start: 2099-01-01
      exclude: [month-end-close]
      input: {action: stop, team: berlin}
steps:
  - {id: switch, task: echo, input: {action: "{{ input.action }}", team: "{{ input.team }}"}}
"""

# no `name`: the schedule takes the workflow's
BROKEN = """\
name: broken-nightly
triggers:
  - cron: {schedule: "0 3 1 1 *"}
steps:
  - id: boom
    task: fail
    input: {message: kaput, retryable: false}
"""

NAME = "stop-dev-envs-test"
UNKNOWN = "error: unknown schedule 'nope' (known: broken-nightly, stop-dev-envs-test) (field: name)"

runner = CliRunner()


def baton(*args: str, **kwargs):
    return runner.invoke(app, list(args), **kwargs)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no repository config/baton.yaml
    for name in ("BATON_CONFIG", "BATON_URL", "BATON_WORKFLOWS", "BATON_HANDLER_MODULES", "BATON_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("schedules")
    wf = root / "wf"
    wf.mkdir()
    (wf / "nightly.yaml").write_text(NIGHTLY)
    (wf / "broken.yaml").write_text(BROKEN)
    (root / "baton.yaml").write_text(CALENDARS)
    proc = ServerProcess(root / "data", wf, BATON_CONFIG=str(root / "baton.yaml"), BATON_NATS__ENABLED="false")
    proc.start(timeout_s=SERVER_START_S)
    try:
        yield proc.url
    finally:
        proc.stop()


def ok(*args: str) -> str:
    result = baton(*args)
    assert result.exit_code == 0, result.output
    return result.stdout


def as_json(server: str, *args: str):
    return orjson.loads(ok(*args, "--url", server, "--json"))


def row(table: str, name: str) -> str:
    (line,) = [line for line in table.splitlines() if f" {name} " in line]
    return line


# --- list and show -----------------------------------------------------------------------


@pytest.mark.integration
def test_list_shows_each_schedule_with_its_next_fire_in_its_zone_and_utc(server):
    listed = as_json(server, "schedules", "list")
    view = next(s for s in listed["schedules"] if s["name"] == NAME)
    nxt = view["next_fires"][0]
    local = datetime.fromisoformat(nxt["local"])
    # the server computed it: 19:00 in Berlin on a weekday, after now, the same instant as `at`
    assert (local.hour, local.minute) == (19, 0) and local.weekday() < 5
    assert local.utcoffset() == ZoneInfo("Europe/Berlin").utcoffset(local.replace(tzinfo=None))
    assert local == datetime.fromisoformat(nxt["at"]) and local > datetime.now(ZoneInfo("UTC"))

    for command in (("schedules",), ("schedules", "list")):  # the bare group lists too
        line = row(ok(*command, "--url", server), NAME)
        assert "dev-envs" in line and "0 19 * * MON-FRI (Europe/Berlin)" in line
        assert nxt["local"] in line and nxt["at"] in line
    assert "0 3 1 1 * (UTC)" in row(ok("schedules", "--url", server), "broken-nightly")
    assert as_json(server, "schedules") == listed


@pytest.mark.integration
def test_show_lists_the_next_five_fires_and_the_calendar(server):
    shown = as_json(server, "schedules", "show", NAME)
    assert shown["schedule"]["name"] == NAME and isinstance(shown["fires"], list)
    upcoming = shown["schedule"]["next_fires"]
    assert len(upcoming) == 5
    out = ok("schedules", "show", NAME, "--url", server)
    assert re.search(r"workflow\s+dev-envs", out) and re.search(r"exclude\s+month-end-close", out)
    assert "At 19:00 on Monday through Friday (Europe/Berlin)" in out
    for fire in upcoming:
        assert fire["local"] in out and fire["at"] in out
        if fire["skip"]:  # in the last 2 business days of a month, the calendar says why
            assert "excluded by calendar 'month-end-close'" in out


@pytest.mark.integration
def test_pause_then_list_shows_paused_and_resume_clears_it(server):
    paused = baton("schedules", "pause", NAME, "--note", "load test tonight", "--url", server)
    assert paused.exit_code == 0, paused.output
    assert paused.stdout.strip() == f"schedule {NAME} paused by anonymous: load test tonight"
    assert "yes by anonymous: load test tonight" in row(ok("schedules", "--url", server), NAME)
    assert re.search(r"paused\s+yes by anonymous: load test tonight", ok("schedules", "show", NAME, "--url", server))
    view = next(s for s in as_json(server, "schedules")["schedules"] if s["name"] == NAME)
    assert view["paused"] is True and view["pause_note"] == "load test tonight"

    resumed = baton("schedules", "resume", NAME, "--url", server)
    assert resumed.exit_code == 0, resumed.output
    view = BatonClient(server).schedule(NAME)
    assert view["paused"] is False
    nxt = view["next_fires"][0]
    assert resumed.stdout.startswith(f"schedule {NAME} resumed; next fire {nxt['local']}")
    assert "yes" not in row(ok("schedules", "--url", server), NAME).split("│")[-2]
    assert as_json(server, "schedules", "pause", NAME)["paused"] is True
    assert as_json(server, "schedules", "resume", NAME)["paused"] is False


# --- run now and the fire records ------------------------------------------------------------


@pytest.mark.integration
def test_run_wait_starts_a_run_that_succeeds_and_fires_lists_it(server):
    result = baton("schedules", "run", NAME, "--wait", "--timeout", "20", "--url", server)
    assert result.exit_code == 0, result.output
    run_id = re.search(rf"started run (\w+) of schedule {NAME}", result.stdout).group(1)
    assert f"run {run_id} succeeded" in result.stdout
    run = BatonClient(server).run(run_id)
    assert run["input"] == {"action": "stop", "team": "berlin"}  # the trigger's input
    assert run["steps"][-1]["output"] == {"action": "stop", "team": "berlin"}

    fires = as_json(server, "schedules", "fires", NAME)
    (fire,) = [f for f in fires["fires"] if f["run_id"] == run_id]
    assert fire["outcome"] == "started" and fire["manual"] is True and fire["by"] == "anonymous"
    assert re.search(rf"started \(manual\)\s+│\s+{run_id}\s+│\s+anonymous", ok("schedules", "fires", NAME, "--url", server))
    shown = ok("schedules", "show", NAME, "--url", server)
    assert re.search(rf"last run\s+{run_id}", shown) and run_id in shown.split("last run")[1]

    started = as_json(server, "schedules", "run", NAME, "--wait")
    assert started["schedule"] == NAME and started["run"]["run_id"] == started["run_id"]
    assert started["run"]["status"] == "succeeded"
    page = as_json(server, "schedules", "fires", NAME, "--limit", "1")
    assert [f["run_id"] for f in page["fires"]] == [started["run_id"]] and page["next_cursor"]
    more = ok("schedules", "fires", NAME, "--limit", "1", "--url", server)
    assert f"more: baton schedules fires {NAME} --cursor " in more


@pytest.mark.integration
def test_run_without_wait_prints_the_run_id_at_once(server):
    started = as_json(server, "schedules", "run", NAME)
    assert set(started) == {"schedule", "run_id", "scheduled_at"}
    assert BatonClient(server).wait(started["run_id"], 10)["status"] == "succeeded"


@pytest.mark.integration
def test_run_wait_of_a_failing_run_exits_1_and_says_why(server):
    result = baton("schedules", "run", "broken-nightly", "--wait", "--url", server)
    assert result.exit_code == 1
    assert re.search(r"run \w+ failed: .*kaput", result.stdout), result.stdout


@pytest.mark.integration
@pytest.mark.parametrize("command", [["show"], ["fires"], ["pause"], ["resume"], ["run"], ["run", "--wait"]])
def test_an_unknown_schedule_exits_1_with_the_servers_message(server, command):
    result = baton("schedules", command[0], "nope", *command[1:], "--url", server)
    assert result.exit_code == 1
    assert result.stderr.strip() == UNKNOWN
    assert result.stdout == ""


@pytest.mark.integration
def test_calendars_lists_the_configured_calendars(server):
    out = ok("calendars", "--url", server)
    assert re.search(r"month-end-close\s+│\s+Europe/Berlin\s+│\s+last 2 business days of the month", out)
    (cal,) = as_json(server, "calendars")["calendars"]
    assert cal["name"] == "month-end-close" and cal["entries"] == ["last 2 business days of the month"]


def test_group_options_before_a_subcommand_are_refused():
    result = baton("schedules", "--json", "show", NAME, "--url", "http://127.0.0.1:9")
    assert result.exit_code == 2 and "after the subcommand" in result.output


# --- validate ------------------------------------------------------------------------------


def write_config(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "baton.yaml").write_text(CALENDARS)
    monkeypatch.setenv("BATON_CONFIG", str(tmp_path / "baton.yaml"))


def test_validate_previews_each_schedule(tmp_path, monkeypatch):
    write_config(tmp_path, monkeypatch)
    (tmp_path / "wf").mkdir()
    (tmp_path / "wf" / "nightly.yaml").write_text(NIGHTLY)
    result = baton("validate", str(tmp_path / "wf"))
    assert result.exit_code == 0, result.output
    line = row(result.stdout, NAME)
    assert "At 19:00 on Monday through Friday (Europe/Berlin)" in line and re.search(r"T19:00:00\+0[12]:00", line)
    assert result.stdout.rstrip().endswith("1 workflow(s) OK, 1 schedule(s) OK")


def test_validate_reports_an_unknown_calendar_with_file_and_trigger(tmp_path, monkeypatch):
    write_config(tmp_path, monkeypatch)
    wf = tmp_path / "wf"
    wf.mkdir()
    typo = wf / "nightly.yaml"
    typo.write_text(NIGHTLY.replace("exclude: [month-end-close]", "exclude: [month-end-clsoe]"))
    (wf / "bad.yaml").write_text("name: bad\nsteps:\n  - {id: a, task: no.such.handler}\n")
    result = baton("validate", str(wf))
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    # every problem in one pass: the handler in one file, the calendar in the other
    assert any(line.startswith(f"{wf / 'bad.yaml'}:3: steps[0].task: ") for line in lines), lines
    assert any(re.match(rf"{re.escape(str(typo))}(:\d+)?: triggers\[0\]\.cron\.exclude: "
                        r"unknown calendar 'month-end-clsoe' \(known: month-end-close\)$", line) for line in lines), lines
    assert result.stdout == ""


def test_validate_reports_a_schedule_name_used_twice(tmp_path, monkeypatch):
    write_config(tmp_path, monkeypatch)
    wf = tmp_path / "wf"
    wf.mkdir()
    (wf / "a.yaml").write_text(NIGHTLY)
    (wf / "b.yaml").write_text(NIGHTLY.replace("name: dev-envs\n", "name: dev-envs-copy\n"))
    result = baton("validate", str(wf))
    assert result.exit_code == 1
    assert re.match(rf"{re.escape(str(wf / 'b.yaml'))}(:\d+)?: triggers\[0\]\.cron: schedule name '{NAME}' is already "
                    r"used by workflow 'dev-envs'", result.stderr), result.stderr


# --- the README example --------------------------------------------------------------------

README_SECTION = "Replace your crontab"


def readme_yaml_blocks() -> list[str]:
    """The ```yaml blocks of the README section, up to the next heading of its level or higher."""
    blocks: list[str] = []
    level = None  # the section's heading level, once found
    fence: list[str] | None = None  # the lines of the yaml block being read
    in_code = False
    for line in (REPO / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
            if level is not None and fence is not None and not in_code:
                blocks.append("\n".join(fence) + "\n")
                fence = None
            elif level is not None and in_code and line.strip() == "```yaml":
                fence = []
            continue
        if in_code:  # a `# comment` in a code block is not a heading
            if fence is not None:
                fence.append(line)
            continue
        heading = re.match(r"(#+) (.*?)\s*$", line)
        if heading and level is None and heading.group(2) == README_SECTION:
            level = len(heading.group(1))
        elif heading and level is not None and len(heading.group(1)) <= level:
            break
    assert level is not None, f"README.md has no section {README_SECTION!r}"
    return blocks


def test_the_readme_crontab_example_loads_and_its_schedules_compile():
    import handlers
    from server.definitions.catalog import Catalog
    from server.definitions.loader import load_workflow_text
    from server.settings import Settings
    from server.triggers.scheduler import compile_schedules

    blocks = readme_yaml_blocks()
    catalog, config = Catalog(), {}
    for n, block in enumerate(blocks):
        data = YAML(typ="safe").load(block)
        if "steps" in data:  # a workflow file; the rest are config/baton.yaml excerpts
            catalog.add(load_workflow_text(block, f"README.md yaml block {n}", known_handlers=set(handlers.REGISTRY.names())))
        else:
            config.update(data)
    assert len(catalog) >= 1 and "calendars" in config, "the section needs a workflow and a calendars block"
    schedules = compile_schedules(catalog, Settings(**config))
    names = set(schedules)
    for team in ("sf", "berlin"):
        assert {f"stop-dev-envs-{team}", f"start-dev-envs-{team}"} <= names
        stop = schedules[f"stop-dev-envs-{team}"].spec
        assert stop.exclude == ["month-end-close"] and stop.on_missed == "run_once" and stop.overlap == "skip"
