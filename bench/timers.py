"""timers: many runs asleep at once, and how late their durable timers fire.

Each run waits until its own due time (`wait_until: "{{ input.at }}"`), then runs a
no-op step. The due times are a base time plus uniform(1, --max-sleep) seconds; the
base is --lead seconds after the first measured start. By default the lead is
estimated from the warm-up's start rate so that the runs are started before the
first one falls due; a run started after its due time has nothing to wait for, is
counted as `started_late` and left out of the lateness figures. The warm-up runs
are of another workflow (the same steps) and sleep for a day: they cost what a
measured start costs, then stay out of the way, as rows in the store.

Figures, from Baton's own records (`GET /v1/export/steps`), not from the client:
* lateness: when the step after the sleep started (the moment the timer fired, as
  the engine recorded it) minus the run's due time; `done_lateness`: when that
  step's handler finished, so the pump's queue and the commit are in it too.
  Timestamps are milliseconds, truncated: a lateness may read up to 1 ms short.
* peak_pending_timers: the most sleeps begun and not yet ended at one moment.
* server RSS with every sleep pending (read after the last start, before the first
  due time), and its peak over the whole benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import aiohttp
import orjson

from bench import harness

WORKFLOW = "timers"
WARMUP_WORKFLOW = "timers-warmup"
WORKFLOW_YAML = """\
name: NAME
steps:
  - id: nap
    wait_until: "{{ input.at }}"
  - {id: ring, task: noop}
"""
QUICK_COUNT = 300
QUICK_MAX_SLEEP_S = 3.0
MIN_SLEEP_S = 1.0
DEFAULT_MAX_SLEEP_S = 60.0
DEFAULT_CONCURRENCY = harness.START_CONCURRENCY
DEFAULT_WARMUP = 200
# The default lead: the warm-up's start rate, with room for a slower stretch, plus a pad.
LEAD_FACTOR = 1.2
WARMUP_SLEEP_S = 86_400.0
LEAD_PAD_S = 3.0
MIN_LEAD_S = 2.0
POLL_S = 0.5  # how often the driver asks whether runs are still asleep
EXPORT_TIMEOUT_S = 600.0  # the whole export; 100,000 runs stream in well under a minute
QUANTILES = (50, 99)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count", type=int, default=10_000, help="sleeping runs (default: 10000)")
    parser.add_argument("--max-sleep", type=float, default=DEFAULT_MAX_SLEEP_S, metavar="SECONDS",
                        help=f"runs are due base + uniform({MIN_SLEEP_S:g}, this) s (default: {DEFAULT_MAX_SLEEP_S:g})")
    parser.add_argument("--lead", type=float, default=None, metavar="SECONDS",
                        help="base time = first start + this (default: estimated from the warm-up's start rate)")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                        help=f"starts in flight at once (default: {DEFAULT_CONCURRENCY})")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                        help=f"runs started before measuring, asleep for a day, not counted (default: {DEFAULT_WARMUP})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the due times (default: 0)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_COUNT} runs sleeping {MIN_SLEEP_S:g}-{QUICK_MAX_SLEEP_S:g} s, for a smoke test")
    harness.add_server_arguments(parser)


# --- starting the runs ---------------------------------------------------------------------


@dataclass
class Started:
    due: dict[str, float] = field(default_factory=dict)  # run_id -> due time (unix s)
    created: dict[str, float] = field(default_factory=dict)  # run_id -> created_at as Baton recorded it
    failures: Counter[str] = field(default_factory=Counter)
    first_s: float = 0.0  # wall clock of the first POST
    wall_s: float = 0.0


async def start_runs(base_url: str, workflow: str, dues: list[float], concurrency: int, deadline: float) -> Started:
    """POST one run per due time, `concurrency` in flight, until `deadline` (monotonic)."""
    result = Started()
    todo = iter(dues)
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=harness.REQUEST_TIMEOUT_S)

    async def worker(http: aiohttp.ClientSession) -> None:
        for at in todo:  # shared iterator: each run is started by exactly one worker
            if time.monotonic() >= deadline:
                result.failures["not started before the deadline"] += 1
                continue
            try:
                async with http.post(f"{base_url}/v1/workflows/{workflow}/runs", json={"input": {"at": at}}) as resp:
                    if resp.status != 201:
                        result.failures[f"start HTTP {resp.status}"] += 1
                        continue
                    run = await resp.json()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                result.failures[f"start {type(exc).__name__}"] += 1
                continue
            result.due[run["run_id"]] = at
            result.created[run["run_id"]] = parse_time(run["created_at"])

    result.first_s = time.time()
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        workers = [asyncio.create_task(worker(http)) for _ in range(min(concurrency, len(dues)))]
        for task in await asyncio.gather(*workers, return_exceptions=True):
            if isinstance(task, BaseException):
                raise task  # a bug in the driver should not pass silently
    result.wall_s = time.perf_counter() - t0
    return result


# --- waiting, and reading Baton's records ------------------------------------------------------


async def asleep(http: aiohttp.ClientSession, base_url: str) -> bool:
    """Is any run of the workflow still running (asleep, or its last step not done)?"""
    async with http.get(f"{base_url}/v1/runs", params={"workflow": WORKFLOW, "status": "running", "limit": "1"}) as resp:
        resp.raise_for_status()
        return bool((await resp.json())["runs"])


async def wait_all_done(base_url: str, deadline: float) -> bool:
    timeout = aiohttp.ClientTimeout(total=harness.REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        while await asleep(http, base_url):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(POLL_S)
    return True


async def export(base_url: str, kind: str, since_s: float) -> list[dict[str, Any]]:
    """Every row of `GET /v1/export/<kind>` (JSON Lines) for the runs created since `since_s`."""
    timeout = aiohttp.ClientTimeout(total=EXPORT_TIMEOUT_S)
    params = {"workflow": WORKFLOW, "format": "jsonl", "since": repr(since_s)}
    rows: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async with http.get(f"{base_url}/v1/export/{kind}", params=params) as resp:
            resp.raise_for_status()
            async for line in resp.content:
                if line.strip():
                    rows.append(orjson.loads(line))
    return rows


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# --- figures -------------------------------------------------------------------------------------


def peak_pending(naps: list[dict[str, Any]]) -> int:
    """The most sleeps begun (their step started) and not yet ended at one moment. At equal
    times an end is counted before a start, so a sleep over at once never counts."""
    moments: list[tuple[float, int]] = []
    for row in naps:
        if row["started_at"]:
            moments.append((parse_time(row["started_at"]), 1))
        if row["finished_at"]:
            moments.append((parse_time(row["finished_at"]), -1))
    peak = pending = 0
    for _, delta in sorted(moments):
        pending += delta
        peak = max(peak, pending)
    return peak


def lateness_figures(steps: list[dict[str, Any]], started: Started) -> dict[str, Any]:
    on_time = {run_id for run_id, due in started.due.items() if started.created[run_id] < due}
    rings = [r for r in steps if r["step"] == "ring" and r["run_id"] in on_time]
    fired = [parse_time(r["started_at"]) - started.due[r["run_id"]] for r in rings if r["started_at"]]
    done = [parse_time(r["finished_at"]) - started.due[r["run_id"]] for r in rings if r["finished_at"]]
    figures = {f"lateness_{k}": v for k, v in harness.latency_figures(fired, QUANTILES).items() if k != "mean_ms"}
    figures.update({f"done_lateness_{k}": v for k, v in harness.latency_figures(done, QUANTILES).items()
                    if k != "mean_ms"})
    return {"started_late": len(started.due) - len(on_time), **figures}


def dues_for(count: int, base_s: float, max_sleep_s: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [base_s + rng.uniform(MIN_SLEEP_S, max_sleep_s) for _ in range(count)]


# --- the benchmark --------------------------------------------------------------------------------


def measure(args: argparse.Namespace, count: int, max_sleep_s: float) -> tuple[dict[str, Any], str]:
    workflows = {f"{name}.yaml": WORKFLOW_YAML.replace("NAME", name) for name in (WORKFLOW, WARMUP_WORKFLOW)}
    with harness.start_server(workflows, sync=args.sync,
                              python_args=harness.server_python_args(args), keep_dir=args.keep_dir) as server:
        deadline = time.monotonic() + args.deadline
        lead_s = args.lead
        if args.warmup:
            warm = asyncio.run(start_runs(server.url, WARMUP_WORKFLOW, [time.time() + WARMUP_SLEEP_S] * args.warmup,
                                          args.concurrency, deadline))
            if warm.failures:
                raise harness.ServerError(f"warm-up failed: {dict(warm.failures)}\n{server.log_tail()}")
            if lead_s is None:
                lead_s = max(MIN_LEAD_S, warm.wall_s / args.warmup * count * LEAD_FACTOR + LEAD_PAD_S)
        if lead_s is None:
            lead_s = MIN_LEAD_S + LEAD_PAD_S
        rss_start, cpu_start = server.rss_kib(), server.cpu_s()
        since_s = time.time()
        base_s = since_s + lead_s
        started = asyncio.run(start_runs(server.url, WORKFLOW, dues_for(count, base_s, max_sleep_s, args.seed),
                                         args.concurrency, deadline))
        rss_pending = server.rss_kib()
        pending_at = time.time()
        finished = asyncio.run(wait_all_done(server.url, deadline))
        wall_s = time.time() - started.first_s
        end_figures = harness.server_figures(server, rss_start, cpu_start, count)
        steps = asyncio.run(export(server.url, "steps", since_s))
        runs = asyncio.run(export(server.url, "runs", since_s))

    statuses = Counter(r["status"] for r in runs if r["run_id"] in started.due)
    failures = Counter(started.failures)
    failures.update({f"run {s}": n for s, n in statuses.items() if s != "succeeded"})
    if not finished:
        failures[f"not finished within {args.deadline:.0f}s"] += 1
    missing = len(started.due) - sum(statuses.values())
    if missing:
        failures["not in the export"] += missing
    ahead_s = min(started.due.values(), default=base_s) - pending_at
    note = (f"due times are base + uniform({MIN_SLEEP_S:g}, {max_sleep_s:g}) s, base = first start + {lead_s:.1f} s"
            f" ({'given' if args.lead is not None else 'estimated from the warm-up start rate'}), so runs are"
            f" started before the first falls due; {started.wall_s:.1f} s of starts,"
            f" RSS read {abs(ahead_s):.1f} s {'before' if ahead_s >= 0 else 'AFTER'} the first due time")
    figures = {
        "workload": "timers",
        "count": count,
        "max_sleep_s": max_sleep_s,
        "lead_s": round(lead_s, 3),
        "concurrency": args.concurrency,
        "sync": args.sync,
        "warmup": args.warmup,
        "succeeded": statuses.get("succeeded", 0),
        "failures": sum(failures.values()),
        "failure_kinds": dict(failures),
        "start_s": round(started.wall_s, 3),
        "starts_per_s": round(len(started.due) / started.wall_s, 1) if started.wall_s else None,
        "peak_pending_timers": peak_pending([r for r in steps if r["step"] == "nap"]),
        **lateness_figures(steps, started),
        "server_rss_start_mib": end_figures["server_rss_start_mib"],
        "server_rss_pending_mib": _mib(rss_pending.get("VmRSS")),
        "server_rss_pending_peak_mib": _mib(rss_pending.get("VmHWM")),
        "server_rss_end_mib": end_figures["server_rss_mib"],
        "server_rss_peak_mib": end_figures["server_rss_peak_mib"],
        "server_cpu_s": end_figures["server_cpu_s"],
        "wall_s": round(wall_s, 3),
        "server_pid": server.pid,
        **harness.environment(),
    }
    return figures, note


def _mib(kib: int | None) -> float | None:
    return None if kib is None else round(kib / 1024, 1)


def main(args: argparse.Namespace) -> int:
    count = QUICK_COUNT if args.quick else args.count
    max_sleep_s = QUICK_MAX_SLEEP_S if args.quick else args.max_sleep
    figures, note = measure(args, count, max_sleep_s)
    harness.out.print(note, highlight=False)
    harness.report(f"timers: {count} sleeping runs, {args.concurrency} starts in flight, sqlite {args.sync}", figures)
    return 0 if figures["failures"] == 0 else 1
