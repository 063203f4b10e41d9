"""park: many runs parked on an approval at once: memory, a restart, then every run signalled.

Each run's first step waits for the signal `approve` (`wait_for_signal: {signal:
approve}`, the README's approval-by-signal), then a no-op step runs. With
`--wait approval` the first step is a real approval instead (`wait_for_signal:
{approval: ...}`: a stored request with a signed link and a `baton.approval.requested`
event), decided per run over HTTP with `POST /v1/runs/{id}/approval`, since a plain
signal never decides an approval.

Phases:
1. start: N runs, each a POST, --concurrency in flight (starts/s). A POST answers
   after the run's start is committed, and the wait is entered in that same
   decision, so a run is parked when its POST answers.
2. parked: the server's VmRSS with all N parked, and its peak (VmHWM) so far.
3. restart: SIGTERM (--kill: SIGKILL), then the same command on the same data
   directory and port. `restart_ready_s` runs from the new process's start to its
   first /readyz 200; the RSS of the new process is read then. --no-restart skips it.
4. signal: every parked run is signalled, paced at --signal-rate per second (send i
   is due at t0 + i / rate: evenly spread, not in bursts), by NATS request/reply on
   `baton.signal.<run_id>.approve` (--signal-via http: `POST .../signals/approve`).
   The latency of a run runs from just before its signal goes out to its `succeeded`
   lifecycle event (`baton.run.park.succeeded`, a CloudEvent whose data has the
   run_id) arriving here, so the outbox's publish is in it; the driver holds no
   request open per run. `recorded_*` is the same up to the run's finished_at in
   Baton's own records (whole milliseconds: it may read up to 1 ms short), and
   `outbox_lag_*` the difference: finished_at to the event's arrival.
5. check: every run's status from `GET /v1/export/runs`. A run not succeeded, a
   refused signal or a run whose end event never came is a failure.

Warm-up runs (--warmup, of a second workflow with the same steps) are parked before
the measured runs start. Half of them are signalled then, the other half after the
restart, before the measured signals, so that each server process is warm when it
is measured. They are left out of every figure (the second half stays parked with
the measured runs, a few hundred among many).
The nats-server is started here, not by Baton, so that it and the driver's
subscription outlive the restart; its CPU is reported apart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
import nats
import nats.errors
import orjson

from bench import events, harness

WORKFLOW = "park"
WARMUP_WORKFLOW = "park-warmup"
SIGNAL = "approve"
SIGNAL_YAML = """\
name: NAME
steps:
  - id: approve
    wait_for_signal: {signal: approve}
  - {id: done, task: noop}
"""
APPROVAL_YAML = """\
name: NAME
steps:
  - id: approve
    wait_for_signal:
      approval: {message: "Release run {{ run.id }}?"}
  - {id: done, task: noop}
"""
END_SUBJECTS = [f"baton.run.*.{status}" for status in sorted(harness.TERMINAL)]
QUICK_RUNS = 300
DEFAULT_RUNS = 100_000
DEFAULT_CONCURRENCY = harness.START_CONCURRENCY
DEFAULT_WARMUP = 200
DEFAULT_SIGNAL_RATE = 1000.0
# Signals awaiting their answer at once. At the default rate a few are; the bound only
# matters when the server falls behind, and then the sends fall behind their schedule.
DEFAULT_WINDOW = 1024
SIGNAL_TIMEOUT_S = 10.0  # one signal's answer: milliseconds unless the server is stuck
NATS_CONNECT_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 5.0
EXPORT_TIMEOUT_S = 600.0  # the whole export: 100,000 rows stream in seconds
QUANTILES = (50, 90, 99)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help=f"parked runs (default: {DEFAULT_RUNS})")
    parser.add_argument("--wait", choices=("signal", "approval"), default="signal",
                        help="what the runs wait for: the signal `approve`, or an approval (default: signal)")
    parser.add_argument("--signal-via", choices=("nats", "http"), default=None,
                        help="how plain signals are sent (default: nats); approvals are decided over HTTP")
    parser.add_argument("--signal-rate", type=float, default=DEFAULT_SIGNAL_RATE, metavar="PER_S",
                        help=f"signals (or decisions) sent per second, evenly paced (default: {DEFAULT_SIGNAL_RATE:g})")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                        help=f"signals awaiting their answer at once (default: {DEFAULT_WINDOW})")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                        help=f"starts in flight at once (default: {DEFAULT_CONCURRENCY})")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                        help=f"runs parked and signalled before measuring, not counted (default: {DEFAULT_WARMUP})")
    restart = parser.add_mutually_exclusive_group()
    restart.add_argument("--kill", action="store_true", help="restart after SIGKILL instead of SIGTERM")
    restart.add_argument("--no-restart", action="store_true", help="signal the runs without restarting first")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_RUNS} runs, for a smoke test")
    harness.add_server_arguments(parser)


# --- run ends, from the lifecycle events ------------------------------------------------------


class Ends:
    """Runs that ended, from `baton.run.<workflow>.<status>`: {run_id: (status, arrival wall time)}.
    A copy of an event (the outbox republishes after a crash) keeps the first arrival."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[str, float]] = {}
        self._waiting: set[str] = set()
        self.done = asyncio.Event()

    async def on_message(self, msg: Any) -> None:
        arrived = time.time()
        try:
            run_id = orjson.loads(msg.data)["data"]["run_id"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        if run_id not in self.seen:
            self.seen[run_id] = (msg.subject.rsplit(".", 1)[1], arrived)
            self._waiting.discard(run_id)
            if not self._waiting:
                self.done.set()

    def expect(self, run_ids: list[str]) -> None:
        self._waiting = set(run_ids) - self.seen.keys()
        if self._waiting:
            self.done.clear()
        else:
            self.done.set()

    async def wait(self, deadline: float) -> bool:
        return await harness.wait_set(self.done, deadline)


# --- starting the runs --------------------------------------------------------------------------


@dataclass
class Started:
    run_ids: list[str] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0


async def start_runs(http: aiohttp.ClientSession, base: str, workflow: str, count: int, concurrency: int,
                     deadline: float) -> Started:
    """POST `count` runs, `concurrency` in flight, until `deadline` (monotonic)."""
    result = Started()
    todo = iter(range(count))

    async def worker() -> None:
        for _ in todo:  # shared iterator: each run is started by exactly one worker
            if time.monotonic() >= deadline:
                result.failures["not started before the deadline"] += 1
                continue
            try:
                async with http.post(f"{base}/v1/workflows/{workflow}/runs", json={"input": {}}) as resp:
                    if resp.status != 201:
                        result.failures[f"start HTTP {resp.status}"] += 1
                        continue
                    result.run_ids.append((await resp.json())["run_id"])
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                result.failures[f"start {type(exc).__name__}"] += 1

    t0 = time.perf_counter()
    for outcome in await asyncio.gather(*(worker() for _ in range(min(concurrency, count))),
                                        return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome  # a bug in the driver should not pass silently
    result.wall_s = time.perf_counter() - t0
    return result


# --- signalling them ----------------------------------------------------------------------------


class Refused(Exception):
    """The server answered a signal or decision with an error (the reason is the message)."""


Send = Callable[[str], Awaitable[None]]


def nats_sender(nc: Any) -> Send:
    async def send(run_id: str) -> None:
        msg = await nc.request(f"baton.signal.{run_id}.{SIGNAL}", b"", timeout=SIGNAL_TIMEOUT_S)
        reply = orjson.loads(msg.data)
        if not reply.get("ok"):
            raise Refused(f"signal {reply.get('error', {}).get('code')}")
    return send


def http_sender(http: aiohttp.ClientSession, base: str, wait: str) -> Send:
    if wait == "approval":
        path, body, ok = "approval", {"decision": "approve"}, 200
    else:
        path, body, ok = f"signals/{SIGNAL}", {}, 202

    async def send(run_id: str) -> None:
        async with http.post(f"{base}/v1/runs/{run_id}/{path}", json=body) as resp:
            await resp.read()
            if resp.status != ok:
                raise Refused(f"{path.split('/')[0]} HTTP {resp.status}")
    return send


@dataclass
class Sent:
    sent_at: dict[str, float] = field(default_factory=dict)  # run_id -> wall time, accepted signals only
    failures: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0
    late_max_s: float = 0.0  # the furthest a send fell behind its schedule


async def send_all(send: Send, run_ids: list[str], rate_per_s: float, window: int, deadline: float) -> Sent:
    """Send one signal per run, send i due at t0 + i / rate_per_s, at most `window` unanswered."""
    result = Sent()
    slots = asyncio.Semaphore(window)

    async def one(run_id: str) -> None:
        try:
            result.sent_at[run_id] = time.time()
            await send(run_id)
        except Refused as exc:
            result.failures[str(exc)] += 1
            del result.sent_at[run_id]
        except (nats.errors.Error, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            result.failures[f"signal {type(exc).__name__}"] += 1
            del result.sent_at[run_id]
        finally:
            slots.release()

    tasks = []
    t0 = time.perf_counter()
    for n, run_id in enumerate(run_ids):
        due = t0 + n / rate_per_s
        ahead_s = due - time.perf_counter()
        if ahead_s > 0:
            await asyncio.sleep(ahead_s)
        await slots.acquire()
        result.late_max_s = max(result.late_max_s, time.perf_counter() - due)
        if time.monotonic() >= deadline:
            result.failures["not signalled before the deadline"] += len(run_ids) - n
            slots.release()
            break
        tasks.append(asyncio.create_task(one(run_id)))
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome  # a bug in the driver should not pass silently
    result.wall_s = time.perf_counter() - t0
    return result


# --- reading Baton's records ------------------------------------------------------------------------


async def export_runs(http: aiohttp.ClientSession, base: str, since_s: float) -> dict[str, dict[str, Any]]:
    """{run_id: row} of `GET /v1/export/runs` (JSON Lines) for the measured workflow's runs since `since_s`."""
    params = {"workflow": WORKFLOW, "format": "jsonl", "since": repr(since_s)}
    rows: dict[str, dict[str, Any]] = {}
    async with http.get(f"{base}/v1/export/runs", params=params,
                        timeout=aiohttp.ClientTimeout(total=EXPORT_TIMEOUT_S)) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if line.strip():
                row = orjson.loads(line)
                rows[row["run_id"]] = row
    return rows


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# --- the benchmark ------------------------------------------------------------------------------------


@dataclass
class Phases:
    started: Started
    sent: Sent
    ends: dict[str, tuple[str, float]]
    rows: dict[str, dict[str, Any]]
    restart: harness.Restart | None
    rss: dict[str, dict[str, int]]  # moment -> VmRSS/VmHWM
    cpu: dict[str, float | None]  # server, nats and client CPU seconds of the signal phase


async def warm_up(server: harness.Server, ends: Ends, send: Send, run_ids: list[str], args: argparse.Namespace,
                  deadline: float) -> None:
    """Signal these warm-up runs and wait until they have ended; ServerError if any did not succeed."""
    sent = await send_all(send, run_ids, args.signal_rate, args.window, deadline)
    ends.expect(list(sent.sent_at))
    finished = await ends.wait(deadline)
    bad = {ends.seen[rid][0] for rid in sent.sent_at if rid in ends.seen} - {"succeeded"}
    if sent.failures or not finished or bad:
        raise harness.ServerError(f"warm-up failed: {dict(sent.failures)}, ended {sorted(bad)}, all ended: {finished}\n"
                                  f"{server.log_tail()}")


def _cpu_used(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else round(after - before, 3)


async def park_and_signal(args: argparse.Namespace, server: harness.Server, nats_pid: int | None, nats_url: str,
                          count: int) -> Phases:
    deadline = time.monotonic() + args.deadline
    try:
        nc = await nats.connect(nats_url, connect_timeout=NATS_CONNECT_TIMEOUT_S, max_reconnect_attempts=3)
    except (nats.errors.Error, OSError, asyncio.TimeoutError) as exc:
        raise harness.ServerError(f"cannot connect to nats-server at {nats_url}: {exc!r}") from None
    timeout = aiohttp.ClientTimeout(total=harness.REQUEST_TIMEOUT_S)
    connector = aiohttp.TCPConnector(limit=max(args.concurrency, args.window))
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            ends = Ends()
            for subject in END_SUBJECTS:
                await nc.subscribe(subject, cb=ends.on_message)
            await nc.flush(timeout=CLOSE_TIMEOUT_S)
            via = args.signal_via or ("http" if args.wait == "approval" else "nats")
            send = nats_sender(nc) if via == "nats" else http_sender(http, server.url, args.wait)

            warm = await start_runs(http, server.url, WARMUP_WORKFLOW, args.warmup, args.concurrency, deadline)
            if warm.failures:
                raise harness.ServerError(f"warm-up failed: {dict(warm.failures)}\n{server.log_tail()}")
            half = len(warm.run_ids) // 2
            await warm_up(server, ends, send, warm.run_ids[:half], args, deadline)

            rss = {"start": server.rss_kib()}
            since_s = time.time() - 1.0  # created_at is whole milliseconds; only this workflow's runs are read
            started = await start_runs(http, server.url, WORKFLOW, count, args.concurrency, deadline)
            rss["parked"] = server.rss_kib()
            restart = None
            if not args.no_restart:
                restart = await asyncio.to_thread(harness.restart_server, server, kill=args.kill)
                rss["restarted"] = server.rss_kib()
            await warm_up(server, ends, send, warm.run_ids[half:], args, deadline)

            cpu_start = server.cpu_s(), harness.proc_cpu_s(nats_pid) if nats_pid else None, time.process_time()
            profiling = harness.py_spy(server.pid, args.py_spy) if args.py_spy else contextlib.nullcontext()
            with profiling:
                sent = await send_all(send, started.run_ids, args.signal_rate, args.window, deadline)
                ends.expect(list(sent.sent_at))
                await ends.wait(deadline)  # a run whose end never came is counted by figures_of()
            rss["end"] = server.rss_kib()
            cpu = {
                "server_cpu_s": _cpu_used(cpu_start[0], server.cpu_s()),
                "nats_cpu_s": _cpu_used(cpu_start[1], harness.proc_cpu_s(nats_pid) if nats_pid else None),
                "client_cpu_s": _cpu_used(cpu_start[2], time.process_time()),
            }
            rows = await export_runs(http, server.url, since_s)
    finally:
        with contextlib.suppress(asyncio.TimeoutError, nats.errors.Error):
            await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT_S)
    measured = set(started.run_ids)
    return Phases(started, sent, {k: v for k, v in ends.seen.items() if k in measured}, rows, restart,
                  rss, cpu)


def _mib(figures: dict[str, int] | None, key: str) -> float | None:
    value = (figures or {}).get(key)
    return None if value is None else round(value / 1024, 1)


def figures_of(args: argparse.Namespace, count: int, p: Phases) -> dict[str, Any]:
    failures = p.started.failures + p.sent.failures
    measured = set(p.started.run_ids)
    statuses = Counter(row["status"] for rid, row in p.rows.items() if rid in measured)
    failures.update({f"run {status}": n for status, n in statuses.items() if status != "succeeded"})
    missing = len(p.started.run_ids) - sum(statuses.values())
    if missing:
        failures["not in the export"] += missing
    no_event = [rid for rid in p.sent.sent_at if rid not in p.ends]
    if no_event:
        failures[f"no end event within {args.deadline:.0f}s"] += len(no_event)
    latencies = [p.ends[rid][1] - at for rid, at in p.sent.sent_at.items()
                 if rid in p.ends and p.ends[rid][0] == "succeeded"]
    recorded = [parse_time(p.rows[rid]["finished_at"]) - at for rid, at in p.sent.sent_at.items()
                if p.rows.get(rid, {}).get("finished_at")]
    # the run's finished_at as recorded -> its lifecycle event received here: the outbox's delay
    lag = [p.ends[rid][1] - parse_time(row["finished_at"]) for rid, row in p.rows.items()
           if rid in p.ends and row.get("finished_at")]
    signalled = len(p.sent.sent_at)
    server_cpu_s = p.cpu["server_cpu_s"]
    restart = p.restart
    return {
        "workload": "park",
        "runs": count,
        "wait": args.wait,
        "signal_via": args.signal_via or ("http" if args.wait == "approval" else "nats"),
        "signal_rate": args.signal_rate,
        "concurrency": args.concurrency,
        "sync": args.sync,
        "warmup": args.warmup,
        "succeeded": statuses.get("succeeded", 0),
        "failures": sum(failures.values()),
        "failure_kinds": dict(failures),
        "start_s": round(p.started.wall_s, 3),
        "starts_per_s": round(len(p.started.run_ids) / p.started.wall_s, 1) if p.started.wall_s else None,
        "server_rss_start_mib": _mib(p.rss["start"], "VmRSS"),
        "server_rss_parked_mib": _mib(p.rss["parked"], "VmRSS"),
        "server_rss_parked_peak_mib": _mib(p.rss["parked"], "VmHWM"),
        "restart": restart.how if restart else "none",
        "stop_s": round(restart.stop_s, 3) if restart else None,
        "stop_exit_code": restart.exit_code if restart else None,
        "restart_ready_s": round(restart.ready_s, 3) if restart else None,
        "server_rss_restarted_mib": _mib(p.rss.get("restarted"), "VmRSS"),
        "signal_s": round(p.sent.wall_s, 3),
        "signals_per_s": round(signalled / p.sent.wall_s, 1) if p.sent.wall_s else None,
        "signal_late_max_ms": round(p.sent.late_max_s * 1000, 3),
        # signal sent -> the run's `succeeded` lifecycle event received here
        **harness.latency_figures(latencies, QUANTILES),
        # signal sent -> the run's finished_at as Baton recorded it
        **{f"recorded_{k}": v for k, v in harness.latency_figures(recorded, QUANTILES).items()
           if k in ("p50_ms", "p99_ms", "max_ms")},
        **{f"outbox_lag_{k}": v for k, v in harness.latency_figures(lag, QUANTILES).items()
           if k in ("p50_ms", "p99_ms")},
        "server_rss_end_mib": _mib(p.rss["end"], "VmRSS"),
        "server_rss_peak_mib": _mib(p.rss["end"], "VmHWM"),  # of the process after the restart, if any
        "server_cpu_s": server_cpu_s,
        "server_cpu_ms_per_signal": round(server_cpu_s / signalled * 1000, 3) if server_cpu_s and signalled else None,
        "nats_cpu_s": p.cpu["nats_cpu_s"],
        "client_cpu_s": p.cpu["client_cpu_s"],
    }


def main(args: argparse.Namespace) -> int:
    count = QUICK_RUNS if args.quick else args.runs
    yaml = APPROVAL_YAML if args.wait == "approval" else SIGNAL_YAML
    workflows = {f"{name}.yaml": yaml.replace("NAME", name) for name in (WORKFLOW, WARMUP_WORKFLOW)}
    with events.nats_server(args.keep_dir) as embedded, harness.tracing(args.tracing) as (trace_env, sink):
        with harness.start_server(workflows, sync=args.sync, python_args=harness.server_python_args(args),
                                  keep_dir=args.keep_dir,
                                  extra_env={**trace_env, "BATON_NATS_URL": embedded.url}) as server:
            phases = asyncio.run(park_and_signal(args, server, embedded.pid, embedded.url, count))
            figures = {**figures_of(args, count, phases), **harness.trace_figures(args.tracing, sink),
                       "server_pid": server.pid, **harness.environment()}
    harness.report(f"park: {count} runs parked on {args.wait}, restart {figures['restart']}, "
                   f"signalled at {args.signal_rate:g}/s over {figures['signal_via']}, sqlite {args.sync}", figures)
    return 0 if figures["failures"] == 0 else 1
