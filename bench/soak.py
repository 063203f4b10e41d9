"""soak: the server's memory over a long stream of chain3 runs. Local only: the
default of 1,000,000 runs takes about half an hour at 600 runs/s, and ~4 GB of disk
(the runs and their histories stay in the database, about 4 KB each).

chain3 runs (three no-op steps, each started with a POST and awaited with /wait,
--concurrency in flight, as `python -m bench chain3` drives them) go in chunks of
--chunk runs; after each chunk the server's VmRSS is read, with the size of its
database files. --warmup runs come first, in chunks too, and are left out of every
figure but `warmup_samples`: caches fill up then, so the first sample after the
warm-up is the baseline. A leak shows as drift: `rss_drift_pct` is the last sample
against that baseline, `rss_max_drift_pct` the highest one against it. Each chunk
is bounded by --deadline; the soak stops at the first chunk with a failed run.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from bench import chain3, harness

DEFAULT_RUNS = 1_000_000
DEFAULT_CHUNK = 10_000
DEFAULT_WARMUP = 20_000
QUICK_RUNS = 3_000
QUICK_CHUNK = 500
QUICK_WARMUP = 1_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS,
                        help=f"measured runs (default: {DEFAULT_RUNS}; local only, not for CI)")
    parser.add_argument("--chunk", type=int, default=DEFAULT_CHUNK,
                        help=f"runs between two RSS samples (default: {DEFAULT_CHUNK})")
    parser.add_argument("--concurrency", type=int, default=chain3.DEFAULT_CONCURRENCY,
                        help=f"runs in flight at once (default: {chain3.DEFAULT_CONCURRENCY})")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                        help=f"runs before the baseline sample, not counted (default: {DEFAULT_WARMUP})")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_RUNS} runs in chunks of {QUICK_CHUNK} after {QUICK_WARMUP}, for a smoke test")
    harness.add_server_arguments(parser)


@dataclass
class Soak:
    samples: list[dict[str, Any]] = field(default_factory=list)
    succeeded: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    stalled_waits: int = 0
    wall_s: float = 0.0
    client_cpu_s: float = 0.0


def db_mib(server: harness.Server) -> float:
    """The size of the server's SQLite files (database, WAL, shared memory)."""
    total = sum(path.stat().st_size for path in (server.workdir / "data").glob("baton.db*"))
    return round(total / 2**20, 1)


async def drive_chunks(server: harness.Server, runs: int, chunk: int, args: argparse.Namespace,
                       label: str) -> Soak:
    """Drive `runs` chain3 runs, `chunk` at a time, sampling the server after each chunk."""
    soak = Soak()
    done = 0
    while done < runs:
        size = min(chunk, runs - done)
        cpu_start = server.cpu_s()
        result = await harness.drive(server.url, chain3.WORKFLOW, size, args.concurrency, args.deadline)
        done += size
        soak.succeeded += len(result.latencies_s)
        soak.failures += result.failures
        soak.stalled_waits += result.stalled_waits
        soak.wall_s += result.wall_s
        soak.client_cpu_s += result.client_cpu_s
        rss, cpu = server.rss_kib().get("VmRSS"), server.cpu_s()
        sample = {
            "runs": done,
            "rss_mib": None if rss is None else round(rss / 1024, 1),
            "runs_per_s": round(size / result.wall_s, 1) if result.wall_s else None,
            "p99_ms": harness.latency_figures(result.latencies_s, (99,))["p99_ms"],
            # robust to a busy machine, unlike runs/s: does a run cost more as the database grows?
            "server_cpu_ms_per_run": None if cpu is None or cpu_start is None else round((cpu - cpu_start) / size * 1000, 3),
            "db_mib": db_mib(server),
        }
        soak.samples.append(sample)
        harness.out.print(f"{label} {done}/{runs}: " + ", ".join(f"{k} {v}" for k, v in sample.items() if k != "runs"),
                          highlight=False, soft_wrap=True)
        if result.failures:
            break  # a failing server tells nothing more about its memory
        if server.proc.poll() is not None:
            raise harness.ServerError(f"server exited with code {server.proc.returncode}\n{server.log_tail()}")
    if done < runs:
        soak.failures["not run after a failed chunk"] += runs - done
    return soak


def drift_pct(value: float | None, base: float | None) -> float | None:
    return None if value is None or not base else round((value - base) / base * 100, 1)


def rss_figures(samples: list[dict[str, Any]]) -> dict[str, Any]:
    values = [s["rss_mib"] for s in samples if s["rss_mib"] is not None]
    first = values[0] if values else None
    return {
        "server_rss_warm_mib": first,
        "server_rss_min_mib": min(values, default=None),
        "server_rss_max_mib": max(values, default=None),
        "server_rss_last_mib": values[-1] if values else None,
        "rss_drift_pct": drift_pct(values[-1] if values else None, first),
        "rss_max_drift_pct": drift_pct(max(values, default=None), first),
    }


def measure(args: argparse.Namespace, runs: int, chunk: int, warmup: int) -> dict[str, Any]:
    with harness.tracing(args.tracing) as (trace_env, sink), \
            harness.start_server({"chain3.yaml": chain3.WORKFLOW_YAML}, sync=args.sync, extra_env=trace_env,
                                 python_args=harness.server_python_args(args), keep_dir=args.keep_dir) as server:
        warm = asyncio.run(drive_chunks(server, warmup, chunk, args, "warm-up"))
        if warm.failures:
            raise harness.ServerError(f"warm-up runs failed: {dict(warm.failures)}\n{server.log_tail()}")
        rss_start, cpu_start = server.rss_kib(), server.cpu_s()
        soak = asyncio.run(drive_chunks(server, runs, chunk, args, "runs"))
        load_figures = harness.server_figures(server, rss_start, cpu_start, soak.succeeded)
        return {
            "workload": "soak",
            "runs": runs,
            "chunk": chunk,
            "concurrency": args.concurrency,
            "sync": args.sync,
            "warmup": warmup,
            "succeeded": soak.succeeded,
            "failures": sum(soak.failures.values()),
            "failure_kinds": dict(soak.failures),
            "stalled_waits": soak.stalled_waits,
            "wall_s": round(soak.wall_s, 3),
            "runs_per_s": round(soak.succeeded / soak.wall_s, 1) if soak.wall_s else None,
            **rss_figures(soak.samples),
            "server_rss_peak_mib": load_figures["server_rss_peak_mib"],
            "server_cpu_s": load_figures["server_cpu_s"],
            "server_cpu_ms_per_run": load_figures["server_cpu_ms_per_run"],
            "db_mib": db_mib(server),
            "client_cpu_s": round(soak.client_cpu_s, 3),
            **harness.trace_figures(args.tracing, sink),
            "samples": soak.samples,
            "warmup_samples": warm.samples,
            "server_pid": server.pid,
            **harness.environment(),
        }


def main(args: argparse.Namespace) -> int:
    runs, chunk, warmup = (QUICK_RUNS, QUICK_CHUNK, QUICK_WARMUP) if args.quick else (args.runs, args.chunk, args.warmup)
    figures = measure(args, runs, chunk, warmup)
    harness.report(f"soak: {runs} chain3 runs in chunks of {chunk}, {args.concurrency} in flight, "
                   f"sqlite {args.sync}", figures)
    return 0 if figures["failures"] == 0 else 1
