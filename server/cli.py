"""The `baton` command: run the server, check workflow files, and drive runs over HTTP.

Exit codes: 0 success; 1 a failure the command reports (workflow problems, an error
from the server, a run that did not succeed under `start --wait`); 2 a usage error
(bad option, JSON that does not parse, invalid settings).

Server-side modules are imported inside the commands that need them, so client
commands start quickly and do not load the engine.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from datetime import datetime
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import orjson
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.style import Style
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from server.client import BatonClient, ClientError
from server.errors import ConfigError
from server.settings import Settings, load_settings
from server.store.base import TERMINAL

app = typer.Typer(
    name="baton", help="Baton: durable workflow orchestration.", no_args_is_help=True,
    add_completion=False, pretty_exceptions_enable=False,
)

# `show --follow` asks the server to hold each poll this long: it answers at once
# when the run ends, so this only sets how often step progress is redrawn.
FOLLOW_POLL_S = 2.0
WAIT_POLL_S = 60.0  # the server's cap on one long poll of /wait
HASH_PREFIX = 12  # enough to tell versions apart at a glance, like a short git hash
DATA_COLUMN_CHARS = 80
# Piped output feeds grep and scripts: tables must not squeeze run ids into 80 columns.
PIPED_WIDTH = 240

UrlOption = Annotated[
    str | None, typer.Option("--url", envvar="BATON_URL", help="Baton server URL (default: settings `url`)")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the raw JSON response.")]
ConfigOption = Annotated[
    Path | None, typer.Option("--config", help="Settings file (default: config/baton.yaml or BATON_CONFIG)")
]

F = TypeVar("F", bound=Callable[..., Any])


def main() -> None:
    app()


# --- helpers --------------------------------------------------------------------------


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def _settings(config: Path | None = None, **overrides: Any) -> Settings:
    if config is not None:
        os.environ["BATON_CONFIG"] = str(config)  # the settings loader reads the file name from here
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except ConfigError as exc:
        raise _fail(exc.message, code=2) from None


def _client(url: str | None) -> BatonClient:
    settings = _settings()
    token = settings.token.get_secret_value() if settings.token is not None else None
    return BatonClient(url or settings.url, token=token)


def _reporting(fn: F) -> F:
    """The command with its ClientErrors turned into `error: <message> (field: ...)`, exit 1."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ClientError as exc:
            field = f" (field: {exc.field})" if exc.field else ""
            raise _fail(f"{exc.message}{field}") from None

    return run  # type: ignore[return-value]


def client_command(fn: F) -> F:
    """Register a command that talks to the server; its ClientErrors become `error: ...`, exit 1."""
    app.command()(_reporting(fn))
    return fn


def _out() -> Console:
    return Console() if sys.stdout.isatty() else Console(width=PIPED_WIDTH)


def _parse_json(text: str, option: str) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise typer.BadParameter(f"not valid JSON: {exc}", param_hint=option) from None


def _print_json(data: Any) -> None:
    typer.echo(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        kind = error.get("type")
        message = error.get("message", "")
        return f"{kind}: {message}" if kind else str(message)
    return str(error)


# --- server ---------------------------------------------------------------------------


@app.command()
def dev(
    port: Annotated[int | None, typer.Option(help="Port to listen on (default: settings)")] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind (default: 127.0.0.1)")] = None,
    config: ConfigOption = None,
) -> None:
    """Run the server for development, and print its URL."""
    settings = _settings(config, host=host, port=port)
    from server.app import run_server

    typer.echo(f"Baton dev server on http://{settings.host}:{settings.port}  (Ctrl-C to stop)")
    run_server(settings, dev=True)


@app.command()
def serve(
    port: Annotated[int | None, typer.Option(help="Port to listen on (default: settings)")] = None,
    host: Annotated[str | None, typer.Option(help="Address to bind (default: 127.0.0.1)")] = None,
    config: ConfigOption = None,
) -> None:
    """Run the server."""
    settings = _settings(config, host=host, port=port)
    if settings.auth.enabled and not settings.auth.tokens:
        raise _fail(
            "API authentication is on and no tokens are configured, so every call would be refused. "
            "Create one with `baton token create NAME --role admin` and add it under auth.tokens in "
            "config/baton.yaml, or set auth.enabled: false (BATON_AUTH__ENABLED=false) to run without auth",
            code=2,
        )
    from server.app import run_server

    run_server(settings, dev=False)


@app.command()
def worker(
    queue: Annotated[list[str], typer.Option("--queue", "-q", metavar="NAME", help="A task queue to serve (repeatable)")],
    handler_modules: Annotated[list[str] | None, typer.Option(
        "--handlers", metavar="MODULE", help="Python module whose @handler functions to serve (repeatable; default: settings `handler_modules`)")] = None,
    concurrency: Annotated[int | None, typer.Option(min=1, help="Tasks run at once (default: settings `worker.concurrency`)")] = None,
    nats_url: Annotated[str | None, typer.Option("--nats-url", metavar="URL", help="NATS server URL(s), comma-separated (default: BATON_NATS_URL, else the embedded server of `baton dev` on 127.0.0.1:4222)")] = None,
    config: ConfigOption = None,
) -> None:
    """Run handlers for the steps that name a `queue`, in this process (a remote worker)."""
    settings = _settings(config, nats_url=nats_url)
    if not settings.nats_servers and settings.nats.embedded_port > 0:
        # no URL: the embedded server `baton dev` runs on this machine
        settings = settings.model_copy(update={"nats_url": f"nats://127.0.0.1:{settings.nats.embedded_port}"})
    if not settings.nats.enabled or not settings.nats_servers:
        raise _fail("a worker needs the NATS server that Baton uses: pass --nats-url or set BATON_NATS_URL", code=2)
    from server.definitions.models import QueueName
    from pydantic import TypeAdapter, ValidationError

    try:
        queues = [TypeAdapter(QueueName).validate_python(q) for q in queue]
    except ValidationError:
        raise typer.BadParameter("a queue name is 1-64 letters, digits, '_' or '-'", param_hint="--queue") from None
    from server.errors import BatonError
    from server.worker import run_worker

    modules = handler_modules if handler_modules is not None else settings.handler_modules
    try:
        run_worker(settings, queues, modules, concurrency=concurrency or settings.worker.concurrency,
                   grace_s=settings.worker.shutdown_grace_s)
    except ImportError as exc:
        raise _fail(str(exc)) from None
    except BatonError as exc:  # NATS unreachable, or refused the streams
        raise _fail(exc.message) from None


# --- definitions ----------------------------------------------------------------------


@app.command()
def validate(
    paths: Annotated[list[Path] | None, typer.Argument(help="Files or directories (default: settings `workflows`)")] = None,
    config: ConfigOption = None,
) -> None:
    """Check workflow files; print every problem as file:line: field: message."""
    settings = _settings(config)
    import handlers
    from server.app import import_handler_modules
    from server.definitions.loader import load_paths

    try:
        import_handler_modules(settings.handler_modules)
    except ImportError as exc:
        raise _fail(str(exc)) from None
    loaded, problems = load_paths(paths or settings.workflows, known_handlers=set(handlers.REGISTRY.names()))
    # the files that loaded are checked against the config's calendars too, so one pass shows everything
    schedules, schedule_problems = _compile_schedules(loaded, settings)
    problems += schedule_problems
    if problems:
        for line in problems:
            typer.echo(line, err=True)
        raise typer.Exit(1)
    table = Table("workflow", "version", "steps", "hash", "file")
    for wf in loaded:
        table.add_row(wf.model.name, wf.model.version, str(len(wf.model.steps)), wf.def_hash[:HASH_PREFIX], wf.path)
    _out().print(table)
    if schedules:
        _out().print(_schedule_preview(schedules))
    typer.echo(f"{len(loaded)} workflow(s) OK" + (f", {len(schedules)} schedule(s) OK" if schedules else ""))


def _compile_schedules(loaded: list[Any], settings: Settings) -> tuple[dict[str, Any], list[str]]:
    """The schedules of these workflows as the server would compile them: unknown calendars,
    duplicate schedule names and bad templates are problems naming the file and trigger."""
    from server.definitions.catalog import Catalog
    from server.errors import DefinitionError
    from server.triggers.scheduler import compile_schedules

    catalog = Catalog()
    for wf in loaded:
        catalog.add(wf)
    try:
        return compile_schedules(catalog, settings), []
    except DefinitionError as exc:
        return {}, list(exc.problems)


def _schedule_preview(schedules: dict[str, Any]) -> Table:
    """Each schedule's next fire from now, by this machine's clock: what the server would do."""
    from datetime import datetime

    from server.runtime.clock import iso
    from server.triggers.schedules import describe

    now = time.time()
    table = Table("schedule", "workflow", "when", "next fire (local)", "next fire (UTC)")
    for name, schedule in sorted(schedules.items()):
        fire = schedule.next_after(now)
        local = "-" if fire is None else datetime.fromtimestamp(fire, schedule.tz).isoformat()
        skip = None if fire is None else schedule.blocked(fire)
        table.add_row(Text(name), Text(schedule.workflow), Text(describe(schedule)),
                      Text(local + (f" (skipped: {skip})" if skip else "")), iso(fire) or "ended")
    return table


@app.command()
def schema() -> None:
    """Print the JSON Schema of workflow files (for editors)."""
    from server.definitions.loader import workflow_json_schema

    typer.echo(orjson.dumps(workflow_json_schema(), option=orjson.OPT_INDENT_2).decode())


token_app = typer.Typer(help="API tokens: create one and put its hash in the config.", no_args_is_help=True)
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Argument(help="Who holds it: shown in the audit log and in history")],
    roles: Annotated[list[str], typer.Option("--role", help="viewer, operator, approver or admin (repeatable)")],
) -> None:
    """Print a new random token (once: keep it) and the config entry that accepts it."""
    from server.api.auth import hash_token, new_token
    from server.settings import ApiToken

    from pydantic import ValidationError

    try:
        entry = ApiToken(name=name, sha256="0" * 64, roles=roles)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise _fail(f"invalid token: {problems}", code=2) from None
    token = new_token()
    typer.echo(f"token: {token}")
    typer.echo("Add this under auth.tokens in config/baton.yaml (the server keeps only the hash):")
    typer.echo(f"  - {{name: {entry.name}, roles: [{', '.join(entry.roles)}], sha256: {hash_token(token)}}}")
    typer.echo(f"Clients send it as `Authorization: Bearer {token[:6]}...`; the CLI reads BATON_TOKEN.")


# --- runs -----------------------------------------------------------------------------


@client_command
def start(
    workflow: Annotated[str, typer.Argument(help="Workflow name")],
    input_json: Annotated[str | None, typer.Option("--input", help="Run input as JSON")] = None,
    input_file: Annotated[Path | None, typer.Option("--input-file", help="Read the run input (JSON) from a file")] = None,
    workflow_id: Annotated[str | None, typer.Option("--workflow-id", help="Business key, unique among open runs")] = None,
    version: Annotated[str | None, typer.Option(help="Definition version (default: latest)")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the run ends; exit 1 unless it succeeded")] = False,
    timeout: Annotated[float | None, typer.Option(help="With --wait: give up after this many seconds")] = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start a run of WORKFLOW."""
    if input_json is not None and input_file is not None:
        raise typer.BadParameter("give --input or --input-file, not both", param_hint="--input-file")
    data = None
    if input_json is not None:
        data = _parse_json(input_json, "--input")
    elif input_file is not None:
        try:
            data = _parse_json(input_file.read_text(encoding="utf-8"), "--input-file")
        except OSError as exc:
            raise typer.BadParameter(f"cannot read {input_file}: {exc.strerror}", param_hint="--input-file") from None
    client = _client(url)
    run, created = client.start(workflow, data, workflow_id=workflow_id, version=version)
    if not as_json:
        note = "started" if created else f"already open for workflow_id {workflow_id!r}:"
        typer.echo(f"{note} run {run['run_id']} ({run['workflow']}@{run['version']}) {run['status']}")
    if wait:
        run = _wait(client, run, timeout)
        if not as_json:
            typer.echo(f"run {run['run_id']} {run['status']}{_why(client, run)}")
    if as_json:
        _print_json(run)
    if wait and run["status"] != "succeeded":
        raise typer.Exit(1)


def _why(client: BatonClient, run: dict[str, Any]) -> str:
    """`: <error>` for a run that ended badly, so a script's log says why it failed."""
    if run["status"] == "succeeded" or run["status"] not in TERMINAL:
        return ""
    error = client.run(run["run_id"]).get("error")
    return f": {_error_text(error)}" if error else ""


def _wait(client: BatonClient, run: dict[str, Any], timeout_s: float | None) -> dict[str, Any]:
    """Long-poll the wait endpoint until the run ends or timeout_s passes (None: no limit)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while run["status"] not in TERMINAL:
        remaining = WAIT_POLL_S if deadline is None else deadline - time.monotonic()
        if remaining <= 0:
            break
        run = client.wait(run["run_id"], min(remaining, WAIT_POLL_S))
    return run


@client_command
def runs(
    status: Annotated[str | None, typer.Option(help="Only runs with this status")] = None,
    workflow: Annotated[str | None, typer.Option(help="Only runs of this workflow")] = None,
    workflow_id: Annotated[str | None, typer.Option("--workflow-id", help="Only runs with this business key")] = None,
    limit: Annotated[int, typer.Option(help="How many runs (1..500)")] = 20,
    cursor: Annotated[str | None, typer.Option(help="Continue a previous listing")] = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """List runs, newest first."""
    items, next_cursor = _client(url).runs(
        status=status, workflow=workflow, workflow_id=workflow_id, limit=limit, cursor=cursor
    )
    if as_json:
        _print_json({"runs": items, "next_cursor": next_cursor})
        return
    table = Table("run", "workflow", "status", "attempt", "workflow_id", "created", "finished")
    for r in items:
        table.add_row(
            r["run_id"], f"{r['workflow']}@{r['version']}", r["status"], str(r["attempt"]),
            r.get("workflow_id") or "", r.get("created_at") or "", r.get("finished_at") or "",
        )
    _out().print(table)
    if next_cursor:
        typer.echo(f"more: baton runs --cursor {next_cursor}")


@client_command
def show(
    run_id: Annotated[str, typer.Argument(help="Run id")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Redraw until the run ends")] = False,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a run and its steps (and its trace in Jaeger, when BATON_JAEGER_URL is set)."""
    client = _client(url)
    run = client.run(run_id)
    if as_json:
        while follow and run["status"] not in TERMINAL:
            client.wait(run_id, FOLLOW_POLL_S)
            run = client.run(run_id)
        _print_json(run)
        return
    render = functools.partial(_render_run, jaeger_url=_settings().jaeger_url)
    console = _out()
    if not follow:
        console.print(render(run))
    elif console.is_terminal:
        with Live(render(run), console=console, auto_refresh=False) as live:
            for run in _follow(client, run):
                live.update(render(run), refresh=True)
    else:  # piped: a log of the changes, not a redraw
        console.print(render(run))
        for run in _follow(client, run):
            console.print(render(run))


def _follow(client: BatonClient, run: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Yield the run each time its status or a step's status changes, until it ends."""
    seen = _progress(run)
    while run["status"] not in TERMINAL:
        client.wait(run["run_id"], FOLLOW_POLL_S)  # answers at once when the run ends
        run = client.run(run["run_id"])
        if _progress(run) != seen:
            seen = _progress(run)
            yield run


def _progress(run: dict[str, Any]) -> tuple:
    return run["status"], tuple((s["key"], s["status"], s.get("attempt")) for s in run.get("steps", []))


def _render_run(run: dict[str, Any], jaeger_url: str | None = None) -> Group:
    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold")
    header.add_column()
    rows = [
        ("run", run["run_id"]),
        ("workflow", f"{run['workflow']}@{run['version']}"),
        ("status", f"{run['status']} (attempt {run['attempt']})"),
        ("workflow_id", run.get("workflow_id") or "-"),
        ("created", run.get("created_at") or "-"),
        ("finished", run.get("finished_at") or "-"),
    ]
    if run.get("trace_id"):
        rows.append(("trace", run["trace_id"]))
    if run.get("waiting_for"):
        rows.append(("waiting for", ", ".join(run["waiting_for"])))
    if run.get("error"):
        rows.append(("error", _error_text(run["error"])))
    for label, value in rows:
        header.add_row(label, Text(str(value)))  # Text: no markup in user data
    if jaeger_url and run.get("trace_id"):
        link = _jaeger_link(jaeger_url, run["trace_id"])
        header.add_row("jaeger", Text(link, style=Style(link=link)))
    steps = Table("step", "kind", "status", "attempts", "duration", "compensation")
    for s in run.get("steps", []):
        duration = s.get("duration_s")
        comp = s.get("compensation") or {}
        steps.add_row(
            Text(s["key"]), s.get("kind") or "", s["status"], str(s.get("attempt", "")),
            f"{duration:.2f}s" if duration is not None else "", comp.get("status") or "",
        )
    return Group(header, Text(""), steps)


@client_command
def history(
    run_id: Annotated[str, typer.Argument(help="Run id")],
    fmt: Annotated[str, typer.Option("--format", help="table, json or csv")] = "table",
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print a run's history (csv and json are exports of every event)."""
    if as_json:
        fmt = "json"
    if fmt not in ("table", "json", "csv"):
        raise typer.BadParameter("expected table, json or csv", param_hint="--format")
    client = _client(url)
    if fmt == "csv":
        typer.echo(client.history_csv(run_id), nl=False)
        return
    events = client.all_history(run_id)
    if fmt == "json":
        _print_json(events)
        return
    table = Table("seq", "at", "type", "key", "data")
    for e in events:
        data = orjson.dumps(e.get("data")).decode()
        if len(data) > DATA_COLUMN_CHARS:
            data = data[: DATA_COLUMN_CHARS - 1] + "…"
        table.add_row(str(e["seq"]), str(e["at"]), e["type"], Text(e.get("key") or ""), Text(data))
    _out().print(table)


@client_command
def trace(
    run_id: Annotated[str, typer.Argument(help="Run id")],
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print a run's spans as a tree: what tracing exports, rebuilt from the run's history
    (no Jaeger needed); a span still open shows as running."""
    answer = _client(url).trace(run_id)
    if as_json:
        _print_json(answer)
        return
    _out().print(_render_trace(answer, _settings().jaeger_url))


def _jaeger_link(jaeger_url: str, trace_id: str) -> str:
    return f"{jaeger_url.rstrip('/')}/trace/{trace_id}"


def _moment(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def _span_time(seconds: float) -> str:
    """Milliseconds under a minute (the API's timestamps have no more), then coarser: a wait may last days."""
    if seconds < 60:
        return f"{seconds:.3f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d{hours:02d}h"
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


STATUS_STYLE = {"ok": "green", "error": "bold red", "unset": "yellow"}
PLAIN_OUTCOMES = {None, "succeeded", "failed"}  # what the status already says
EVENT_ATTRS = {  # span event attribute -> how a line shows it
    "baton.retry.delay_s": lambda v: f"in {_span_time(float(v))}",
    "baton.signal.by": lambda v: f"by {v}" if v else "",
    "baton.approval.decision": str,
    "baton.approval.by": lambda v: f"by {v}" if v else "",
    "baton.steps": lambda v: f"steps {v}",
    "baton.step.id": str,
}


def _render_trace(answer: dict[str, Any], jaeger_url: str | None = None) -> Group:
    """The span tree; offsets count from the start of the run span above (one per run attempt)."""
    spans = answer["spans"]
    ids = {s["span_id"] for s in spans}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for s in spans:  # the answer is in start order, so each list is too
        children.setdefault(s["parent_id"] if s["parent_id"] in ids else None, []).append(s)
    tree = Tree(Text(f"trace {answer['trace_id']}  run {answer['run_id']}", style="bold"))
    for root in children.get(None, []):
        _add_span(tree, root, children, _moment(root["start"]))
    parts: list[Any] = [tree]
    if not spans:
        parts.append(Text("no spans yet: the run has not started"))
    if jaeger_url:
        parts.append(Text(f"jaeger  {_jaeger_link(jaeger_url, answer['trace_id'])}"))
    return Group(*parts)


def _add_span(parent: Tree, span: dict[str, Any], children: dict[str | None, list[dict[str, Any]]], t0: float) -> None:
    node = parent.add(_span_line(span, t0))
    items = [(_moment(e["at"]), 0, e) for e in span["events"] if e["name"] != "exception"]  # the message says it
    items += [(_moment(c["start"]), 1, c) for c in children.get(span["span_id"], [])]
    for _, is_span, item in sorted(items, key=lambda x: (x[0], x[1])):
        if is_span:
            _add_span(node, item, children, t0)
        else:
            node.add(_event_line(item, t0))


def _span_line(span: dict[str, Any], t0: float) -> Text:
    attrs = span.get("attributes") or {}
    status, outcome = span["status"], attrs.get("baton.outcome")
    line = Text.assemble((span["name"], "bold"), "  ", (status, STATUS_STYLE.get(status, "")))
    if outcome not in PLAIN_OUTCOMES:
        line.append(f" ({outcome})")
    line.append(f"  +{_span_time(_moment(span['start']) - t0)}")
    if span["end"] is None:
        line.append("  running", style="cyan")
    else:
        line.append(f"  {_span_time(span['duration_s'] or 0.0)}")
    attempt = attrs.get("baton.step.attempt", attrs.get("baton.run.attempt"))
    if attempt is not None:
        line.append(f"  attempt {attempt}")
    if span["kind"] == "producer" and attrs.get("baton.queue"):
        line.append(f"  queue {attrs['baton.queue']}")
    if status == "error" and span.get("message"):
        line.append(f"  {span['message']}", style="red")
    return line


def _event_line(event: dict[str, Any], t0: float) -> Text:
    attrs = event.get("attributes") or {}
    shown = [EVENT_ATTRS[k](v) for k, v in attrs.items() if k in EVENT_ATTRS and v is not None]
    shown += [f"{k}={v}" for k, v in attrs.items() if k not in EVENT_ATTRS]
    details = " ".join(x for x in shown if x)
    return Text(f"• {event['name']}  +{_span_time(_moment(event['at']) - t0)}" + (f"  {details}" if details else ""),
                style="dim")


@client_command
def signal(
    run_id: Annotated[str, typer.Argument(help="Run id")],
    name: Annotated[str, typer.Argument(help="Signal name")],
    data: Annotated[str | None, typer.Option("--data", help="Signal payload as JSON")] = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Send a signal (e.g. an approval) to a waiting run."""
    payload = None if data is None else _parse_json(data, "--data")
    result = _client(url).signal(run_id, name, payload)
    if as_json:
        _print_json(result)
    else:
        typer.echo(f"signal {name} delivered to run {run_id}")


@client_command
def cancel(
    run_id: Annotated[str, typer.Argument(help="Run id")],
    reason: Annotated[str | None, typer.Option(help="Why; kept in the run's history")] = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Cancel a run (its completed steps are compensated)."""
    run = _client(url).cancel(run_id, reason)
    _print_json(run) if as_json else typer.echo(f"run {run['run_id']} {run['status']}")


@client_command
def retry(
    run_id: Annotated[str, typer.Argument(help="Run id")],
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Retry a failed, compensated or cancelled run from its failed step."""
    run = _client(url).retry(run_id)
    _print_json(run) if as_json else typer.echo(f"run {run['run_id']} {run['status']} (attempt {run['attempt']})")


@client_command
def workflows(
    name: Annotated[str | None, typer.Argument(help="Show this workflow's loaded versions instead")] = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """List the workflows the server has loaded, or with NAME every loaded version of one."""
    if name is not None:
        _workflow_versions(_client(url).workflow_versions(name), as_json)
        return
    items = _client(url).workflows()
    if as_json:
        _print_json(items)
        return
    table = Table("workflow", "version", "steps", "hash", "description")
    for wf in items:
        table.add_row(
            wf["name"], str(wf["version"]), str(len(wf.get("steps") or [])),
            (wf.get("def_hash") or "")[:HASH_PREFIX], Text(wf.get("description") or ""),
        )
    _out().print(table)


def _workflow_versions(listing: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(listing)
        return
    table = Table("version", "hash", "latest", "description")
    for v in listing["versions"]:
        table.add_row(str(v["version"]), v["def_hash"][:HASH_PREFIX], "yes" if v["latest"] else "", Text(v["description"]))
    _out().print(table)


@client_command
def dlq(
    replay: Annotated[int | None, typer.Option("--replay", help="Replay this dead letter through its trigger")] = None,
    limit: Annotated[int, typer.Option(help="How many dead letters (1..500)")] = 20,
    cursor: Annotated[str | None, typer.Option(help="Continue a previous listing")] = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """List events that could not start a run (newest first), or replay one with --replay ID."""
    client = _client(url)
    if replay is not None:
        result = client.replay_dead_letter(replay)
        if as_json:
            _print_json(result)
        else:
            for run in result["runs"]:
                typer.echo(f"dead letter {replay} replayed: run {run['run_id']} of {run['workflow']}")
        return
    items, next_cursor = client.dead_letters(limit=limit, cursor=cursor)
    if as_json:
        _print_json({"dead_letters": items, "next_cursor": next_cursor})
        return
    table = Table("id", "at", "subject", "workflow", "error", "replayed")
    for d in items:
        table.add_row(str(d["id"]), d["at"] or "", d["subject"], d.get("workflow") or "", Text(d["error"]),
                      d.get("replay_run") or "")
    _out().print(table)
    if next_cursor:
        typer.echo(f"more: baton dlq --cursor {next_cursor}")


PUBLISH_CONNECT_S = 5.0  # `baton publish` is interactive: a broker that is not there is said at once


@app.command()
def publish(
    subject: Annotated[str, typer.Argument(help="NATS subject, e.g. orders.created")],
    data: Annotated[str, typer.Argument(help="The event's data, as JSON")],
    event_type: Annotated[str | None, typer.Option("--type", help="CloudEvent type (default: the subject)")] = None,
    event_id: Annotated[str | None, typer.Option("--id", help="CloudEvent id, also the Nats-Msg-Id (default: random)")] = None,
    source: Annotated[str, typer.Option(help="CloudEvent source")] = "baton-cli",
    raw: Annotated[bool, typer.Option("--raw", help="Publish DATA as the body, not wrapped in a CloudEvent")] = False,
    nats_url: Annotated[str | None, typer.Option("--nats-url", envvar="BATON_NATS_URL",
                                                 help="NATS server (default: settings `nats_url`, else the "
                                                      "embedded one of `baton dev` on 127.0.0.1)")] = None,
    config: ConfigOption = None,
) -> None:
    """Publish an event on NATS JetStream, as event triggers receive it: a CloudEvent
    (structured JSON) whose id is also its Nats-Msg-Id, so publishing it again is a duplicate."""
    import asyncio
    import uuid

    from server.bus.connection import Bus
    from server.errors import BusError

    body = _parse_json(data, "DATA")
    settings = _settings(config, nats_url=nats_url)
    servers = settings.nats_servers or [f"nats://127.0.0.1:{settings.nats.embedded_port}"]
    event_id = event_id or uuid.uuid4().hex
    payload = body if raw else {
        "specversion": "1.0", "id": event_id, "source": source, "type": event_type or subject,
        "time": datetime.now().astimezone().isoformat(timespec="milliseconds"),
        "datacontenttype": "application/json", "data": body,
    }
    nats_settings = settings.nats.model_copy(update={"startup_wait_s": PUBLISH_CONNECT_S})

    async def send() -> Any:
        bus = Bus(servers, nats_settings, name="baton-cli")
        await bus.connect()
        try:
            return await bus.publish(subject, orjson.dumps(payload), msg_id=event_id)
        finally:
            await bus.close()

    try:
        ack = asyncio.run(send())
    except BusError as exc:
        hint = ""
        if "no response from stream" in exc.message.lower():
            hint = (f" (no JetStream stream captures {subject!r}: is Baton running, with a workflow whose "
                    "event trigger matches it?)")
        raise _fail(exc.message + hint) from None
    note = " (duplicate: already in the stream, not delivered again)" if ack.duplicate else ""
    typer.echo(f"published {event_id} on {subject}: stream {ack.stream}, seq {ack.seq}{note}")


# --- approvals ------------------------------------------------------------------------


@client_command
def approvals(
    status: Annotated[str, typer.Option(help="pending, approved, rejected, expired, cancelled or all")] = "pending",
    limit: Annotated[int, typer.Option(help="How many (1..500)")] = 20,
    cursor: Annotated[str | None, typer.Option(help="Continue a previous listing")] = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """List approval requests, newest first (pending ones by default; links need the approver role)."""
    items, next_cursor = _client(url).approvals(status=status, limit=limit, cursor=cursor)
    if as_json:
        _print_json({"approvals": items, "next_cursor": next_cursor})
        return
    table = Table("run", "workflow", "step", "message", "requested", "expires", "status")
    for a in items:
        table.add_row(a["run_id"], f"{a['workflow']}@{a['version']}", Text(a["key"]), Text(a.get("message") or ""),
                      a.get("requested_at") or "", a.get("expires_at") or a.get("link_expires_at") or "", a["status"])
    _out().print(table)
    # links under the table, whole: a table column would cut them to the terminal's width
    pending = [a for a in items if a["status"] == "pending"]
    for a in pending:
        typer.echo(f"link {a['run_id']} {a['key']}: {a.get('link') or '(the approver role is needed to see it)'}")
    if next_cursor:
        typer.echo(f"more: baton approvals --cursor {next_cursor}")


@client_command
def approve(
    run_id: Annotated[str, typer.Argument(help="Run id")],
    reject: Annotated[bool, typer.Option("--reject", help="Reject instead of approve")] = False,
    comment: Annotated[str | None, typer.Option(help="Why; kept in the run's history")] = None,
    step: Annotated[str | None, typer.Option(help="The step to decide, when the run waits on several")] = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Approve (or --reject) the approval RUN_ID is waiting for (approver role)."""
    result = _client(url).decide(run_id, "reject" if reject else "approve", comment=comment, step=step)
    if as_json:
        _print_json(result)
        return
    approval, run = result["approval"], result["run"]
    typer.echo(f"step {approval['key']} of run {run['run_id']} {approval['status']} by {approval['decided_by']};"
               f" run {run['status']}")


# --- schedules and calendars ----------------------------------------------------------

schedules_app = typer.Typer(
    help="Cron and interval triggers: list them with their next fires, pause, resume, fire now.",
    invoke_without_command=True,
)
app.add_typer(schedules_app, name="schedules")
# `baton schedules show` lists this many of the latest fire records
SHOW_FIRES = 10


def schedule_command(name: str) -> Callable[[F], F]:
    """Register `baton schedules NAME`; like client_command, its ClientErrors become `error: ...`, exit 1."""

    def register(fn: F) -> F:
        schedules_app.command(name)(_reporting(fn))
        return fn

    return register


@schedules_app.callback()
def schedules_default(
    ctx: typer.Context,
    # no envvar here: these only serve the bare `baton schedules`, and must not swallow a subcommand's
    url: Annotated[str | None, typer.Option("--url", help="Baton server URL (default: settings `url`)")] = None,
    as_json: JsonOption = False,
) -> None:
    """List schedules (same as `baton schedules list`)."""
    if ctx.invoked_subcommand is None:
        _reporting(schedules_list)(url=url, as_json=as_json)
    elif url is not None or as_json:
        raise typer.BadParameter(f"give them after the subcommand: baton schedules {ctx.invoked_subcommand} ... --json",
                                 param_hint="--url/--json")


@schedule_command("list")
def schedules_list(url: UrlOption = None, as_json: JsonOption = False) -> None:
    """List schedules: when they fire, the next fire (own zone and UTC), the last fire and its outcome."""
    items = _client(url).schedules()
    if as_json:
        _print_json({"schedules": items})
        return
    table = Table("schedule", "workflow", "when", "next fire (local)", "next fire (UTC)", "last fire", "paused")
    for s in items:
        nxt = s["next_fires"][0] if s["next_fires"] else None
        table.add_row(
            Text(s["name"]), Text(s["workflow"]), Text(_when(s)),
            Text(_fire_local(nxt)) if nxt else "-", nxt["at"] if nxt else "ended",
            Text(_last_fire(s)), Text(_paused(s)),
        )
    _out().print(table)
    if not items:
        typer.echo("no schedules: add a `cron:` or `every:` trigger to a workflow")


def _when(s: dict[str, Any]) -> str:
    return f"{s['schedule']} ({s['timezone']})" if s["kind"] == "cron" else f"every {s['schedule']}"


def _fire_local(fire: dict[str, Any]) -> str:
    """The fire in the schedule's zone, marked when a calendar will skip it (`show` says why)."""
    return f"{fire['local']} (skipped)" if fire.get("skip") else fire["local"]


def _last_fire(s: dict[str, Any]) -> str:
    if s["last_outcome"] is None:
        return "-"
    return f"{s['last_fire_at'] or 'run now'} {s['last_outcome']}"


def _paused(s: dict[str, Any]) -> str:
    """`yes by alice: <note>`, or empty when it is not paused."""
    return "yes" + _paused_by(s) if s["paused"] else ""


def _paused_by(s: dict[str, Any]) -> str:
    return (f" by {s['paused_by']}" if s.get("paused_by") else "") + (f": {s['pause_note']}" if s.get("pause_note") else "")


def _fire_table(fires: list[dict[str, Any]]) -> Table:
    table = Table("id", "scheduled (UTC)", "handled (UTC)", "outcome", "run", "by", "reason")
    for f in fires:
        outcome = f["outcome"] + "".join(f" ({flag})" for flag in ("missed", "manual") if f.get(flag))
        if f.get("count", 1) > 1:
            outcome += f" x{f['count']}"
        table.add_row(str(f["id"]), f["scheduled_at"], f["fired_at"], outcome, f.get("run_id") or "",
                      Text(f.get("by") or ""), Text(f.get("reason") or ""))
    return table


@schedule_command("show")
def schedules_show(
    name: Annotated[str, typer.Argument(help="Schedule name (`baton schedules` lists them)")],
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a schedule: its settings, the next 5 fires and the latest fire records."""
    client = _client(url)
    s = client.schedule(name)
    fires, _ = client.schedule_fires(name, limit=SHOW_FIRES)
    if as_json:
        _print_json({"schedule": s, "fires": fires})
        return
    header = Table.grid(padding=(0, 2))
    header.add_column(style="bold")
    header.add_column()
    rows = [
        ("schedule", s["name"]),
        ("workflow", s["workflow"]),
        (s["kind"], f"{s['schedule']}: {s['description']}" if s["kind"] == "cron" else s["description"]),
        ("timezone", s["timezone"]),
        ("paused", _paused(s) or "no"),
        ("on missed", s["on_missed"] + (f" (max_catch_up {s['max_catch_up']})" if s.get("max_catch_up") else "")),
        ("overlap", s["overlap"] + (f" ({s['queued']} queued)" if s.get("queued") else "")),
    ]
    if s.get("jitter_s"):
        rows.append(("jitter", f"up to {s['jitter_s']:g}s"))
    if s["exclude"]:
        rows.append(("exclude", ", ".join(s["exclude"])))
    if s["only_within"]:
        rows.append(("only within", ", ".join(s["only_within"])))
    if s.get("start") or s.get("end"):
        rows.append(("between", f"{s.get('start') or '-'} and {s.get('end') or '-'}"))
    rows += [("last fire", _last_fire(s)), ("last run", s.get("last_run_id") or "-")]
    for label, value in rows:
        header.add_row(label, Text(str(value)))
    upcoming = Table("next fires (local)", "UTC", "skipped")
    for f in s["next_fires"]:
        upcoming.add_row(Text(f["local"]), f["at"], Text(f.get("skip") or ""))
    console = _out()
    console.print(Group(header, Text(""), upcoming if s["next_fires"] else Text("no more fires: the schedule has ended")))
    console.print(_fire_table(fires) if fires else Text("no fires recorded yet"))


@schedule_command("fires")
def schedules_fires(
    name: Annotated[str, typer.Argument(help="Schedule name")],
    limit: Annotated[int, typer.Option(help="How many fire records (1..500)")] = 20,
    cursor: Annotated[str | None, typer.Option(help="Continue a previous listing")] = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """List a schedule's fires, newest first: the runs started, and why other fires started none."""
    fires, next_cursor = _client(url).schedule_fires(name, limit=limit, cursor=cursor)
    if as_json:
        _print_json({"fires": fires, "next_cursor": next_cursor})
        return
    _out().print(_fire_table(fires))
    if next_cursor:
        typer.echo(f"more: baton schedules fires {name} --cursor {next_cursor}")


@schedule_command("pause")
def schedules_pause(
    name: Annotated[str, typer.Argument(help="Schedule name")],
    note: Annotated[str | None, typer.Option(help="Why, for whoever looks next")] = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Pause a schedule: it starts nothing until resumed (operator role)."""
    s = _client(url).pause_schedule(name, note)
    _print_json(s) if as_json else typer.echo(f"schedule {s['name']} paused{_paused_by(s)}")


@schedule_command("resume")
def schedules_resume(
    name: Annotated[str, typer.Argument(help="Schedule name")],
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Resume a schedule from its next fire after now; fires that fell in the pause are not run (operator role)."""
    s = _client(url).resume_schedule(name)
    if as_json:
        _print_json(s)
        return
    nxt = s["next_fires"][0] if s["next_fires"] else None
    typer.echo(f"schedule {s['name']} resumed; next fire " + (f"{_fire_local(nxt)} ({nxt['at']})" if nxt else "none: it has ended"))


@schedule_command("run")
def schedules_run(
    name: Annotated[str, typer.Argument(help="Schedule name")],
    wait: Annotated[bool, typer.Option("--wait", help="Wait until the run ends; exit 1 unless it succeeded")] = False,
    timeout: Annotated[float | None, typer.Option(help="With --wait: give up after this many seconds")] = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Start a run of the schedule's workflow now, with the schedule's input (ignores pause, calendars and overlap; operator role)."""
    client = _client(url)
    started = client.run_schedule(name)
    if not as_json:
        typer.echo(f"started run {started['run_id']} of schedule {started['schedule']}")
    if not wait:
        if as_json:
            _print_json(started)
        return
    run = _wait(client, client.run(started["run_id"]), timeout)
    if as_json:
        _print_json({**started, "run": run})
    else:
        typer.echo(f"run {run['run_id']} {run['status']}{_why(client, run)}")
    if run["status"] != "succeeded":
        raise typer.Exit(1)


@client_command
def calendars(url: UrlOption = None, as_json: JsonOption = False) -> None:
    """List the calendars of the server's config, and whether this moment is in each."""
    items = _client(url).calendars()
    if as_json:
        _print_json({"calendars": items})
        return
    table = Table("calendar", "timezone", "entries", "now", "description")
    for c in items:
        table.add_row(Text(c["name"]), c["timezone"], Text("; ".join(c["entries"])),
                      Text(f"in it: {c['now']}" if c["now"] else "not in it"), Text(c.get("description") or ""))
    _out().print(table)
    if not items:
        typer.echo("no calendars: declare them under `calendars:` in config/baton.yaml")


# --- audit log and exports ------------------------------------------------------------

SinceOption = Annotated[str | None, typer.Option(help="From this moment on: 2026-01-01, 2026-01-01T08:00:00Z or unix seconds")]
UntilOption = Annotated[str | None, typer.Option(help="Before this moment (same forms as --since)")]


@client_command
def audit(
    since: SinceOption = None,
    until: UntilOption = None,
    actor: Annotated[str | None, typer.Option(help="Only this actor (a token name, unauthenticated, system)")] = None,
    action: Annotated[str | None, typer.Option(help="Only this action (start_run, cancel, definition.loaded, ...)")] = None,
    limit: Annotated[int, typer.Option(help="How many entries (1..500)")] = 20,
    cursor: Annotated[str | None, typer.Option(help="Continue a previous listing")] = None,
    url: UrlOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show the audit log, newest first: who did what, when, from where, and how it ended (admin role)."""
    entries, next_cursor = _client(url).audit(since=since, until=until, actor=actor, action=action, limit=limit,
                                              cursor=cursor)
    if as_json:
        _print_json({"entries": entries, "next_cursor": next_cursor})
        return
    table = Table("at", "actor", "action", "target", "status", "remote", "detail")
    for e in entries:
        detail = e.get("detail") or {}
        note = detail.get("error") or detail.get("run_id") or ", ".join(detail.get("runs") or []) or ""
        table.add_row(e["at"], Text(e["actor"]), e["action"], Text(e.get("target") or ""),
                      "" if e.get("status") is None else str(e["status"]), e.get("remote") or "", Text(note))
    _out().print(table)
    if next_cursor:
        typer.echo(f"more: baton audit --cursor {next_cursor}")


EXPORTS = ("runs", "steps")
EXPORT_FORMATS = ("csv", "jsonl")


@client_command
def export(
    what: Annotated[str, typer.Argument(help="runs (one row per run) or steps (one row per step attempt)")],
    since: SinceOption = None,
    until: UntilOption = None,
    workflow: Annotated[str | None, typer.Option(help="Only runs of this workflow")] = None,
    status: Annotated[str | None, typer.Option(help="Only runs with this status")] = None,
    fmt: Annotated[str, typer.Option("--format", help="csv or jsonl")] = "csv",
    url: UrlOption = None,
) -> None:
    """Write runs or step attempts created in [--since, --until) to stdout as CSV or JSON Lines, as they stream in.

    baton export runs --since 2026-01-01 --format csv > runs.csv
    """
    if what not in EXPORTS:
        raise typer.BadParameter(f"expected runs or steps, not {what!r}", param_hint="WHAT")
    if fmt not in EXPORT_FORMATS:
        raise typer.BadParameter(f"expected csv or jsonl, not {fmt!r}", param_hint="--format")
    out = typer.get_binary_stream("stdout")
    chunks = _client(url).export(what, fmt=fmt, since=since, until=until, workflow=workflow, status=status)
    try:
        for chunk in chunks:
            out.write(chunk)
        out.flush()
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        chunks.close()
        # Python would report the pipe again when it flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())

