"""chain3: throughput of three-step no-op runs started and awaited through the HTTP API.

Each run is a POST that starts it, then a long-poll on /wait until it ends; its
latency runs from the POST to the answer of the last /wait. runs/s counts every
measured run, from the first POST to the last answer. Warm-up runs come first and
are left out of every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from typing import Any

from bench import harness

WORKFLOW = "chain3"
WORKFLOW_YAML = """\
name: chain3
steps:
  - {id: a, task: noop}
  - {id: b, task: noop}
  - {id: c, task: noop}
"""
QUICK_RUNS = 200
DEFAULT_CONCURRENCY = 64  # enough in flight for group commit to batch, few enough to stay on one client loop
QUANTILES = (50, 90, 99)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=2000, help="measured runs (default: 2000)")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                        help=f"runs in flight at once (default: {DEFAULT_CONCURRENCY})")
    parser.add_argument("--warmup", type=int, default=50, help="runs before measuring, not counted (default: 50)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_RUNS} runs, for a smoke test")
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite",
                        help="the store: sqlite (one server), or postgres (replicas; see --replicas)")
    parser.add_argument("--replicas", type=int, default=1,
                        help="with --db postgres: measure 1 replica, then this many sharing the database (default: 1)")
    harness.add_server_arguments(parser)


def measure(args: argparse.Namespace, workload: str, runs: int, concurrency: int) -> dict[str, Any]:
    """Start a server, warm it up, drive `runs` chain3 runs and return every figure."""
    with harness.tracing(args.tracing) as (trace_env, sink), \
            harness.start_server({"chain3.yaml": WORKFLOW_YAML}, sync=args.sync, extra_env=trace_env,
                                 python_args=harness.server_python_args(args), keep_dir=args.keep_dir) as server:
        warm = asyncio.run(harness.drive(server.url, WORKFLOW, args.warmup, concurrency, args.deadline))
        if warm.failures:
            raise harness.ServerError(f"warm-up runs failed: {dict(warm.failures)}\n{server.log_tail()}")
        rss_start, cpu_start = server.rss_kib(), server.cpu_s()
        profiling = harness.py_spy(server.pid, args.py_spy) if args.py_spy else contextlib.nullcontext()
        with profiling:
            result = asyncio.run(harness.drive(server.url, WORKFLOW, runs, concurrency, args.deadline))
        figures: dict[str, Any] = {
            "workload": workload,
            "runs": runs,
            "concurrency": concurrency,
            "sync": args.sync,
            "warmup": args.warmup,
            "succeeded": len(result.latencies_s),
            "failures": sum(result.failures.values()),
            "failure_kinds": dict(result.failures),
            "stalled_waits": result.stalled_waits,
            "wall_s": round(result.wall_s, 3),
            "runs_per_s": round(runs / result.wall_s, 1) if result.wall_s else None,
            **harness.latency_figures(result.latencies_s, QUANTILES),
            **harness.server_figures(server, rss_start, cpu_start, runs),
            "client_cpu_s": round(result.client_cpu_s, 3),
            **harness.trace_figures(args.tracing, sink),
            "server_pid": server.pid,
            **harness.environment(),
        }
    return figures


def main(args: argparse.Namespace) -> int:
    runs = QUICK_RUNS if args.quick else args.runs
    if args.db == "postgres" or args.replicas > 1:
        from bench import replicas

        return replicas.main(args, runs, {"chain3.yaml": WORKFLOW_YAML}, WORKFLOW)
    figures = measure(args, "chain3", runs, args.concurrency)
    harness.report(f"chain3: {runs} runs, {args.concurrency} in flight, sqlite {args.sync}", figures)
    return 0 if figures["failures"] == 0 else 1
