"""fanout: one run mapping a step over many items, at most `max_concurrency` at once.

The run is one `map` step over `range(input.count)`; each item runs
`bench.inflight` (bench/bench_handlers.py, loaded into the server), which returns
how many invocations of it were in flight in the server when it started, itself
included. The largest value in the map's output is therefore the peak concurrency,
measured inside the server, not assumed. Each invocation sleeps --delay-ms (0: it
only yields once, a no-op step that still lets others start meanwhile).

Figures: items/s = items / the run's wall time, from the POST that starts it to the
/wait answer that says it ended (`server_items_per_s`: the same over Baton's own
created_at -> finished_at); peak_concurrency, and how many items saw it; the run's
status. The map's output is the list of every item's result, and the run's detail
(`GET /v1/runs/{id}`) lists every item's step: `detail_bytes` and `detail_s` say
what reading such a run back costs a client. A warm-up run of --warmup items comes
first and is left out of every figure.

The server's executor limits handlers per workflow (128 by default); when
--max-concurrency is above that limit, the server is started with the limit raised
to match, so that the map's own limit is the one measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections import Counter
from datetime import datetime
from typing import Any

import aiohttp

from bench import harness
from server.settings import Limits

WORKFLOW = "fanout"
WORKFLOW_YAML = """\
name: fanout
steps:
  - id: each
    map:
      items: "range(input.count) | list"
      max_concurrency: {max_concurrency}
      steps:
        - {{id: work, task: bench.inflight, input: {{delay_ms: "{{{{ input.delay_ms }}}}"}}}}
"""
HANDLER_MODULES = ["bench.bench_handlers"]
MAX_ITEMS = 100_000  # the expression sandbox builds ranges up to this length
DEFAULT_ITEMS = 10_000
DEFAULT_MAX_CONCURRENCY = 100
QUICK_ITEMS = 500
DEFAULT_WARMUP = 200
DETAIL_TIMEOUT_S = 120.0  # reading back a run of 100,000 items: large, but not minutes
DEFAULT_LIMITS = Limits()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--items", type=int, default=DEFAULT_ITEMS,
                        help=f"items of the measured run, at most {MAX_ITEMS} (default: {DEFAULT_ITEMS})")
    parser.add_argument("--max-concurrency", type=int, default=DEFAULT_MAX_CONCURRENCY,
                        help=f"the map's max_concurrency (default: {DEFAULT_MAX_CONCURRENCY})")
    parser.add_argument("--delay-ms", type=float, default=0.0,
                        help="each item's handler sleeps this long; 0 only yields (default: 0)")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                        help=f"items of a run before measuring, not counted; 0 for none (default: {DEFAULT_WARMUP})")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_ITEMS} items, for a smoke test")
    harness.add_server_arguments(parser)


def server_env(max_concurrency: int) -> dict[str, str]:
    env = {"BATON_HANDLER_MODULES": json.dumps(HANDLER_MODULES)}
    if max_concurrency > DEFAULT_LIMITS.max_concurrent_tasks_per_workflow:
        env["BATON_LIMITS__MAX_CONCURRENT_TASKS_PER_WORKFLOW"] = str(max_concurrency)
    if max_concurrency > DEFAULT_LIMITS.max_concurrent_tasks:
        env["BATON_LIMITS__MAX_CONCURRENT_TASKS"] = str(max_concurrency)
    return env


# --- one run ---------------------------------------------------------------------------------


async def run_map(http: aiohttp.ClientSession, base: str, count: int, delay_ms: float,
                  deadline: float) -> tuple[dict[str, Any], float]:
    """Start a run over `count` items and long-poll /wait until it ends or `deadline` (monotonic)
    passes; returns the run as last seen and the seconds from the POST to that answer."""
    t0 = time.perf_counter()
    async with http.post(f"{base}/v1/workflows/{WORKFLOW}/runs",
                         json={"input": {"count": count, "delay_ms": delay_ms}}) as resp:
        if resp.status != 201:
            raise harness.ServerError(f"start: HTTP {resp.status}: {await resp.text()}")
        run = await resp.json()
    while run["status"] not in harness.TERMINAL and time.monotonic() < deadline:
        wait_s = max(0.1, min(harness.WAIT_TIMEOUT_S, deadline - time.monotonic()))
        async with http.get(f"{base}/v1/runs/{run['run_id']}/wait", params={"timeout": str(wait_s)}) as resp:
            if resp.status != 200:
                raise harness.ServerError(f"wait: HTTP {resp.status}: {await resp.text()}")
            run = await resp.json()
    return run, time.perf_counter() - t0


async def read_detail(http: aiohttp.ClientSession, base: str, run_id: str) -> tuple[dict[str, Any], int, float]:
    """The run's detail, its size in bytes and the seconds it took to read."""
    t0 = time.perf_counter()
    async with http.get(f"{base}/v1/runs/{run_id}", timeout=aiohttp.ClientTimeout(total=DETAIL_TIMEOUT_S)) as resp:
        body = await resp.read()
        if resp.status != 200:
            raise harness.ServerError(f"detail: HTTP {resp.status}: {body[:500]!r}")
    return json.loads(body), len(body), time.perf_counter() - t0


def concurrency_figures(output: Any, items: int) -> tuple[dict[str, Any], Counter[str]]:
    """The peak from the map's output: one in-flight count per item."""
    problems: Counter[str] = Counter()
    if not isinstance(output, list) or not all(isinstance(n, int) for n in output):
        problems["output is not a list of in-flight counts"] += 1
        return {"peak_concurrency": None, "items_at_peak": None}, problems
    if len(output) != items:
        problems[f"output has {len(output)} items, not {items}"] += 1
    peak = max(output, default=0)
    return {"peak_concurrency": peak, "items_at_peak": output.count(peak)}, problems


# --- the benchmark -----------------------------------------------------------------------------


async def drive(args: argparse.Namespace, server: harness.Server, items: int) -> dict[str, Any]:
    deadline = time.monotonic() + args.deadline
    timeout = aiohttp.ClientTimeout(total=harness.REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        if args.warmup:
            warm, _ = await run_map(http, server.url, args.warmup, args.delay_ms, deadline)
            if warm["status"] != "succeeded":
                raise harness.ServerError(f"warm-up run ended {warm['status']}\n{server.log_tail()}")
        rss_start, cpu_start = server.rss_kib(), server.cpu_s()
        client_cpu_start = time.process_time()
        profiling = harness.py_spy(server.pid, args.py_spy) if args.py_spy else contextlib.nullcontext()
        with profiling:
            run, wall_s = await run_map(http, server.url, items, args.delay_ms, deadline)
        load_figures = harness.server_figures(server, rss_start, cpu_start, items)
        client_cpu_s = time.process_time() - client_cpu_start
        detail, detail_bytes, detail_s = await read_detail(http, server.url, run["run_id"])

    failures: Counter[str] = Counter()
    if run["status"] != "succeeded":
        failures[f"run {run['status']}" if run["status"] in harness.TERMINAL
                 else f"not finished within {args.deadline:.0f}s"] += 1
    peak, problems = concurrency_figures(detail.get("output"), items)
    failures.update(problems)
    server_wall_s = None
    if run.get("finished_at"):
        server_wall_s = parse_time(run["finished_at"]) - parse_time(run["created_at"])
    cpu_s = load_figures.pop("server_cpu_ms_per_run")
    return {
        "workload": "fanout",
        "items": items,
        "max_concurrency": args.max_concurrency,
        "delay_ms": args.delay_ms,
        "sync": args.sync,
        "warmup": args.warmup,
        "status": run["status"],
        "failures": sum(failures.values()),
        "failure_kinds": dict(failures),
        **peak,
        "wall_s": round(wall_s, 3),
        "items_per_s": round(items / wall_s, 1) if wall_s else None,
        "server_wall_s": None if server_wall_s is None else round(server_wall_s, 3),
        "server_items_per_s": round(items / server_wall_s, 1) if server_wall_s else None,
        "detail_bytes": detail_bytes,
        "detail_s": round(detail_s, 3),
        **load_figures,
        "server_cpu_ms_per_item": cpu_s,
        "client_cpu_s": round(client_cpu_s, 3),
        "server_pid": server.pid,
        **harness.environment(),
    }


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def main(args: argparse.Namespace) -> int:
    items = QUICK_ITEMS if args.quick else args.items
    workflow = WORKFLOW_YAML.format(max_concurrency=args.max_concurrency)
    with harness.tracing(args.tracing) as (trace_env, sink), \
            harness.start_server({"fanout.yaml": workflow}, sync=args.sync, keep_dir=args.keep_dir,
                                 python_args=harness.server_python_args(args),
                                 extra_env={**trace_env, **server_env(args.max_concurrency)}) as server:
        figures = asyncio.run(drive(args, server, items))
        figures.update(harness.trace_figures(args.tracing, sink))
    harness.report(f"fanout: one run over {items} items, max_concurrency {args.max_concurrency}, "
                   f"sqlite {args.sync}", figures)
    return 0 if figures["failures"] == 0 else 1
