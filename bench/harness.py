"""Shared benchmark harness: a real Baton server in its own process, a load driver, a report.

The server runs as `python -m server serve` in a fresh temporary directory, on a free
loopback port, with a durable SQLite file, exactly as users run it; the load driver
is an aiohttp client in this process. Client and server share the machine, so the
figures measure the pair; the client's CPU time is reported beside the server's so a
client-bound result can be told from a server-bound one.

Every wait here is bounded in count and time: start-up, each run, the whole load
and shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from rich.console import Console
from rich.table import Table

REPO_ROOT = Path(__file__).resolve().parent.parent
# POSTs in flight when starting many runs: enough for group commit to batch, few enough
# to stay on one client loop
START_CONCURRENCY = 64
TERMINAL = frozenset({"succeeded", "failed", "compensated", "cancelled"})

# Start-up loads the handler modules, the workflow files and the SQLite schema;
# a second or two on a busy machine, so 20 s only trips on a real failure.
STARTUP_TIMEOUT_S = 20.0
HEALTH_POLL_S = 0.05
# SIGTERM lets running handlers finish (shutdown_grace_s, 10 s by default) first.
SHUTDOWN_TIMEOUT_S = 15.0
KILL_TIMEOUT_S = 5.0
# The server answers /wait as soon as the run ends; the timeout only bounds a stuck run.
WAIT_TIMEOUT_S = 30.0
MAX_WAIT_POLLS = 4  # a run not terminal after 4 × 30 s is counted as a failure
# A /wait answered this close to its timeout was not woken by the run's end (a lost
# wake-up, or a run that really took that long): counted apart, as `stalled_waits`.
STALL_MARGIN_S = 1.0
REQUEST_TIMEOUT_S = WAIT_TIMEOUT_S + 15.0
LOG_TAIL_CHARS = 4000

out = Console()


# --- the server process -----------------------------------------------------------------


def free_port() -> int:
    """A loopback port nobody is listening on (the kernel picks it; a small race is accepted)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS (current) and VmHWM (peak) of a process, in KiB, from /proc/<pid>/status."""
    figures: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return figures
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            figures[key] = int(value.split()[0])
    return figures


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process, from /proc/<pid>/stat (fields 14 and 15)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; the fields after its ')' are plain.
    fields = text[text.rindex(")") + 2:].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    """A running `python -m server serve`; build with `start_server()`."""

    proc: subprocess.Popen[bytes]
    url: str
    workdir: Path
    log_path: Path
    # how the process was started, so `restart_server()` can start it again alike
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> dict[str, int]:
        return proc_status(self.pid)

    def cpu_s(self) -> float | None:
        return proc_cpu_s(self.pid)

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""


class ServerError(RuntimeError):
    pass


def _server_env(workdir: Path, port: int, sync: str) -> dict[str, str]:
    # neither the caller's Baton settings nor its OpenTelemetry ones: `--tracing` decides
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATON_", "OTEL_"))}
    config = workdir / "baton.yaml"
    config.write_text("")  # so the repository's config/baton.yaml is never read
    env.update(
        BATON_CONFIG=str(config),
        BATON_DATA_DIR=str(workdir / "data"),
        BATON_WORKFLOWS=json.dumps([str(workdir / "workflows")]),
        BATON_HOST="127.0.0.1",
        BATON_PORT=str(port),
        BATON_HANDLER_MODULES="[]",
        BATON_SQLITE_SYNC=sync,
        BATON_LOG_LEVEL="WARNING",
        BATON_AUTH__ENABLED="false",  # the driver measures orchestration, not token checks
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p),
    )
    return env


def _wait_healthy(server: Server, timeout_s: float, path: str = "/healthz", poll_s: float = HEALTH_POLL_S) -> None:
    deadline = time.monotonic() + timeout_s
    polls = int(timeout_s / poll_s) + 1
    for _ in range(polls):
        if server.proc.poll() is not None:
            raise ServerError(f"server exited with code {server.proc.returncode} during start-up:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(f"{server.url}{path}", timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    raise ServerError(f"server not answering {path} after {timeout_s:.0f}s:\n{server.log_tail()}")


def stop_server(server: Server) -> int | None:
    """SIGTERM, then SIGKILL if the server has not exited within SHUTDOWN_TIMEOUT_S."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(SHUTDOWN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            out.print(f"[yellow]server {server.pid} ignored SIGTERM for {SHUTDOWN_TIMEOUT_S:.0f}s; killing it[/]")
            server.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.proc.wait(KILL_TIMEOUT_S)
    return server.proc.returncode


def _spawn(cmd: list[str], workdir: Path, env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:  # appended: a restarted server's log follows the previous one's
        return subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)


# Restarting on a full database (recovery) may take longer than a fresh start; the
# poll is finer than start-up's because the time to ready is the figure.
RESTART_TIMEOUT_S = 120.0
READY_POLL_S = 0.01


@dataclass(frozen=True)
class Restart:
    how: str  # "sigterm" or "sigkill"
    stop_s: float  # the signal until the old process exited
    exit_code: int | None
    ready_s: float  # the new process started until /readyz answered 200


def restart_server(server: Server, *, kill: bool = False, timeout_s: float = RESTART_TIMEOUT_S,
                   between: Callable[[], None] | None = None) -> Restart:
    """Stop the server (SIGTERM, or SIGKILL with `kill`) and start it again with the same
    command, environment, directory and port; `server` then names the new process.
    `between` is called while no server runs (the chaos loop checks the database there).
    Blocks until the new process answers /readyz with 200 (or raises ServerError)."""
    t0 = time.perf_counter()
    if kill:
        server.proc.kill()
        server.proc.wait(KILL_TIMEOUT_S)
        code = server.proc.returncode
    else:
        code = stop_server(server)
    stopped = time.perf_counter()
    if between is not None:
        between()
    server.proc = _spawn(server.cmd, server.workdir, server.env, server.log_path)
    started = time.perf_counter()
    _wait_healthy(server, timeout_s, path="/readyz", poll_s=READY_POLL_S)
    return Restart("sigkill" if kill else "sigterm", stopped - t0, code, time.perf_counter() - started)


@contextlib.contextmanager
def start_server(
    workflows: dict[str, str], *, sync: str = "normal", python_args: Sequence[str] = (),
    keep_dir: bool = False, extra_env: dict[str, str] | None = None,
) -> Iterator[Server]:
    """Run a server with `workflows` ({file name: YAML}) in a fresh temporary directory.

    `python_args` go between the interpreter and `-m server serve`, e.g.
    `["-m", "cProfile", "-o", "/tmp/server.prof"]` to profile the server.
    `extra_env` is added to the server's environment, e.g. `{"BATON_NATS_URL": url}`.
    """
    # mkdtemp, not TemporaryDirectory: the latter's finalizer deletes the directory at
    # interpreter exit, even when keep_dir asked to keep it
    workdir = Path(tempfile.mkdtemp(prefix="baton-bench-"))
    try:
        wf_dir = workdir / "workflows"
        wf_dir.mkdir()
        for name, text in workflows.items():
            (wf_dir / name).write_text(text)
        port = free_port()
        log_path = workdir / "server.log"
        cmd = [sys.executable, *python_args, "-m", "server", "serve"]
        env = {**_server_env(workdir, port, sync), **(extra_env or {})}
        server = Server(_spawn(cmd, workdir, env, log_path), f"http://127.0.0.1:{port}", workdir, log_path, cmd, env)
        try:
            _wait_healthy(server, STARTUP_TIMEOUT_S)
            yield server
        finally:
            code = stop_server(server)
            if code not in (0, None):
                out.print(f"[yellow]server exited with code {code}[/]; log tail:\n{server.log_tail()}",
                          highlight=False, markup=False)
    finally:
        if keep_dir:
            out.print(f"kept {workdir}", highlight=False)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


async def wait_set(event: asyncio.Event, deadline: float) -> bool:
    """Wait for `event` until the monotonic `deadline`; False if it passed first."""
    try:
        await asyncio.wait_for(event.wait(), max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        return False
    return True


# --- profiling the server with py-spy ---------------------------------------------------

PY_SPY_RATE_HZ = 100  # py-spy pauses the server for each sample; 100/s keeps that cost small
PY_SPY_ATTACH_S = 5.0
PY_SPY_WRITE_S = 30.0


@contextlib.contextmanager
def py_spy(pid: int, output: Path) -> Iterator[None]:
    """Sample process `pid` with `py-spy record` (raw format, per thread) while the block runs."""
    exe = shutil.which("py-spy", path=sysconfig.get_path("scripts")) or shutil.which("py-spy")
    if exe is None:
        raise ServerError("py-spy is not installed (pip install py-spy)")
    log_path = output.with_name(output.name + ".log")
    cmd = [exe, "record", "-o", str(output), "--format", "raw", "--threads",
           "-r", str(PY_SPY_RATE_HZ), "--pid", str(pid)]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + PY_SPY_ATTACH_S
        while b"Sampling" not in log_path.read_bytes() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(HEALTH_POLL_S)
        if proc.poll() is not None:
            raise ServerError(f"py-spy exited with code {proc.returncode}: {log_path.read_text(errors='replace')}")
        yield
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
            try:
                proc.wait(PY_SPY_WRITE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(KILL_TIMEOUT_S)
        out.print(f"py-spy profile of server {pid}: {output} (python -m bench.profile_summary {output})",
                  highlight=False)


# --- the load driver --------------------------------------------------------------------


@dataclass
class LoadResult:
    latencies_s: list[float] = field(default_factory=list)  # successful runs only
    failures: Counter[str] = field(default_factory=Counter)
    stalled_waits: int = 0
    first_post: float = math.inf
    last_done: float = -math.inf
    client_cpu_s: float = 0.0

    @property
    def completed(self) -> int:
        return len(self.latencies_s) + sum(self.failures.values())

    @property
    def wall_s(self) -> float:
        return max(0.0, self.last_done - self.first_post)


async def _one_run(http: aiohttp.ClientSession, base: str, workflow: str, result: LoadResult) -> None:
    """POST a run, then long-poll /wait until it ends; record its latency or why it failed."""
    t0 = time.perf_counter()
    result.first_post = min(result.first_post, t0)
    try:
        async with http.post(f"{base}/v1/workflows/{workflow}/runs", json={"input": {}}) as resp:
            if resp.status != 201:
                result.failures[f"start HTTP {resp.status}"] += 1
                return
            run = await resp.json()
        run_id = run["run_id"]
        for _ in range(MAX_WAIT_POLLS):
            if run["status"] in TERMINAL:
                break
            asked = time.perf_counter()
            async with http.get(f"{base}/v1/runs/{run_id}/wait", params={"timeout": str(WAIT_TIMEOUT_S)}) as resp:
                if resp.status != 200:
                    result.failures[f"wait HTTP {resp.status}"] += 1
                    return
                run = await resp.json()
            if time.perf_counter() - asked >= WAIT_TIMEOUT_S - STALL_MARGIN_S:
                result.stalled_waits += 1
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        result.failures[type(exc).__name__] += 1
        return
    finally:
        result.last_done = max(result.last_done, time.perf_counter())
    if run["status"] == "succeeded":
        result.latencies_s.append(time.perf_counter() - t0)
    else:
        result.failures[f"run {run['status']}"] += 1


async def drive(base: str, workflow: str, runs: int, concurrency: int, deadline_s: float) -> LoadResult:
    """Start `runs` runs of `workflow`, at most `concurrency` in flight, within `deadline_s`."""
    result = LoadResult()
    if runs <= 0:
        return result
    todo = iter(range(runs))
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)

    async def worker(http: aiohttp.ClientSession) -> None:
        for _ in todo:  # shared iterator: each run is taken by exactly one worker
            await _one_run(http, base, workflow, result)

    cpu0 = time.process_time()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        tasks = [asyncio.create_task(worker(http)) for _ in range(min(concurrency, runs))]
        done, pending = await asyncio.wait(tasks, timeout=deadline_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()  # a bug in the driver should not pass silently
    result.client_cpu_s = time.process_time() - cpu0
    missing = runs - result.completed
    if missing:
        result.failures[f"not finished within {deadline_s:.0f}s"] += missing
    return result


# --- figures and the report -------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (a value that was observed); None for no values."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_figures(latencies_s: Sequence[float], quantiles: Sequence[int]) -> dict[str, float | None]:
    values = sorted(latencies_s)
    figures: dict[str, float | None] = {}
    for q in quantiles:
        p = percentile(values, q)
        figures[f"p{q}_ms"] = None if p is None else round(p * 1000, 3)
    figures["max_ms"] = round(values[-1] * 1000, 3) if values else None
    figures["mean_ms"] = round(sum(values) / len(values) * 1000, 3) if values else None
    return figures


def environment() -> dict[str, Any]:
    return {"python": platform.python_version(), "cpus": os.cpu_count()}


def server_figures(server: Server, rss_start: dict[str, int], cpu_start_s: float | None, runs: int) -> dict[str, Any]:
    rss = server.rss_kib()
    cpu = server.cpu_s()
    cpu_used = None if cpu is None or cpu_start_s is None else cpu - cpu_start_s
    return {
        "server_rss_start_mib": _mib(rss_start.get("VmRSS")),
        "server_rss_mib": _mib(rss.get("VmRSS")),
        "server_rss_peak_mib": _mib(rss.get("VmHWM")),
        "server_cpu_s": None if cpu_used is None else round(cpu_used, 3),
        "server_cpu_ms_per_run": None if cpu_used is None or not runs else round(cpu_used / runs * 1000, 3),
    }


def _mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def report(title: str, figures: dict[str, Any]) -> None:
    """A readable table, then every figure as one JSON object on the last line of stdout."""
    out.print(f"[bold]{title}[/]", highlight=False)
    table = Table(show_header=True)
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in figures.items():
        table.add_row(key, _fmt(value))
    out.print(table)
    sys.stdout.flush()
    print(json.dumps(figures, separators=(", ", ": ")), flush=True)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
    if isinstance(value, list):  # a series (soak's samples): too long for a cell, whole in the JSON line
        return f"{len(value)} values (in the JSON line)"
    return "-" if value is None else str(value)


# --- command-line options every workload takes ------------------------------------------


def add_server_arguments(parser: Any) -> None:
    parser.add_argument("--sync", choices=("normal", "full"), default="normal",
                        help="SQLite synchronous mode of the server (default: normal)")
    parser.add_argument("--deadline", type=float, default=600.0, metavar="SECONDS",
                        help="give up on runs not finished after this long (default: 600)")
    parser.add_argument("--cprofile", type=Path, metavar="FILE",
                        help="run the server under cProfile and write its stats to FILE at exit")
    parser.add_argument("--py-spy", type=Path, metavar="FILE",
                        help="sample the server with py-spy during the measured runs; raw profile to FILE")
    parser.add_argument("--keep-dir", action="store_true",
                        help="keep the server's temporary directory (database, log)")


    parser.add_argument("--tracing", choices=("on", "off"), default="off",
                        help="export OpenTelemetry spans of every run over OTLP/HTTP to a sink in this "
                             "process (default: off)")


class TraceSink:
    """An OTLP/HTTP endpoint on loopback that takes span exports and counts them, without
    decoding: the server pays for building and sending its spans, the driver very little."""

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="trace-sink", daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self._take)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _take(self, request: web.Request) -> web.Response:
        self.bytes += len(await request.read())
        self.requests += 1
        return web.Response(body=b"", content_type="application/x-protobuf")  # an empty ExportTraceServiceResponse

    def __enter__(self) -> TraceSink:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@contextlib.contextmanager
def tracing(mode: str) -> Iterator[tuple[dict[str, str], TraceSink | None]]:
    """The server environment for `--tracing on|off`, and the sink spans go to when on."""
    if mode != "on":
        yield {"OTEL_SDK_DISABLED": "true"}, None
        return
    with TraceSink() as sink:
        yield {"BATON_TRACING__ENABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint}, sink


def trace_figures(mode: str, sink: TraceSink | None) -> dict[str, Any]:
    return {"tracing": mode, "trace_exports": sink.requests if sink else 0,
            "trace_mib": round(sink.bytes / 2**20, 2) if sink else 0.0}


def server_python_args(args: Any) -> list[str]:
    return ["-m", "cProfile", "-o", str(args.cprofile.resolve())] if args.cprofile else []
