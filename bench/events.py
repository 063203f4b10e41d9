"""events: sustained throughput of runs started by JetStream events.

N CloudEvents (structured JSON) are published into JetStream, pipelined a window
at a time; each starts a three-step no-op run through the workflow's event
trigger (consumer → dedupe → start → commit → ack). Completions are counted from
Baton's own lifecycle events (`baton.run.events.<status>`, a core subscription),
not by polling the API; each measured run's detail is then read over HTTP.

Figures: events/s from the first publish to the last run committed (the latest
`created_at`), end-to-end/s from the first publish to the last `succeeded`
lifecycle event, and the latency from an event's publish to its run's first step
starting. Server timestamps are milliseconds, truncated, so a latency may read up
to 1 ms short. Warm-up events come first and are left out of every figure.

By default the events are published as fast as the window allows, far faster than
runs are started, so they queue in the stream and the latency is mostly that
backlog; `--rate` paces the publishes below the sustained rate to see the latency
of a server keeping up.

The nats-server is started here, not by Baton, so its CPU is reported apart.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import shutil
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import nats
import nats.errors

from bench import harness
from server.bus.embedded import EmbeddedNats
from server.errors import BusError

WORKFLOW = "events"
SUBJECT = "bench.events.created"
WORKFLOW_YAML = """\
name: events
triggers:
  - event:
      subject: "bench.events.>"
      input: {n: "{{ event.data.n }}", sent_at: "{{ event.data.sent_at }}"}
steps:
  - {id: a, task: noop}
  - {id: b, task: noop}
  - {id: c, task: noop}
"""
END_SUBJECTS = [f"baton.run.{WORKFLOW}.{status}" for status in sorted(harness.TERMINAL)]
STREAM = "BATON_EVENTS"  # the server's default trigger stream; created at its start-up
QUICK_EVENTS = 300
DEFAULT_WINDOW = 256  # publishes awaiting their PubAck at once: pipelined, yet bounded
NATS_CONNECT_TIMEOUT_S = 5.0
PUBLISH_TIMEOUT_S = 10.0  # one PubAck; the stream answers in milliseconds unless the server is stuck
STREAM_WAIT_S = 10.0  # the server creates the stream before it reports healthy; this is a safety net
STREAM_POLL_S = 0.1
DETAIL_CONCURRENCY = 16  # run detail GETs in flight after the load (not measured)
DETAILS_TIMEOUT_S = 300.0  # every run detail read, all together
CLOSE_TIMEOUT_S = 5.0
QUANTILES = (50, 90, 99)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--events", type=int, default=5000, help="measured events, one run each (default: 5000)")
    parser.add_argument("--warmup", type=int, default=100, help="events before measuring, not counted (default: 100)")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                        help=f"publishes awaiting their ack at once (default: {DEFAULT_WINDOW})")
    parser.add_argument("--rate", type=float, default=0.0, metavar="EVENTS_PER_S",
                        help="pace the publishes to this rate; 0 = as fast as the window allows (default: 0)")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_EVENTS} events, for a smoke test")
    harness.add_server_arguments(parser)


# --- publishing ---------------------------------------------------------------------------


@dataclass
class Published:
    sent_at: list[float] = field(default_factory=list)  # wall clock, acked publishes only
    failures: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0

    @property
    def acked(self) -> int:
        return len(self.sent_at)


def cloud_event(event_id: str, n: int, sent_at: float) -> bytes:
    """A structured-mode CloudEvent (CloudEvents 1.0, JSON format)."""
    return json.dumps({
        "specversion": "1.0", "id": event_id, "source": "/bench", "type": "bench.event.created",
        "datacontenttype": "application/json", "data": {"n": n, "sent_at": sent_at},
    }).encode()


async def publish(js: Any, tag: str, count: int, window: int, rate_per_s: float, deadline: float) -> Published:
    """Publish `count` events, at most `window` awaiting their ack, paced to `rate_per_s` if not 0,
    until `deadline` (monotonic). Each one's sent_at is read just before it goes out; each
    publish is bounded by PUBLISH_TIMEOUT_S, so a free slot is never waited for longer."""
    result = Published()
    slots = asyncio.Semaphore(window)

    async def one(n: int) -> float:
        try:
            event_id = f"{tag}-{n}"
            sent_at = time.time()
            # Nats-Msg-Id as a careful producer sets it: JetStream dedupes, Baton keys its run by it
            await js.publish(SUBJECT, cloud_event(event_id, n, sent_at), timeout=PUBLISH_TIMEOUT_S,
                             headers={"Nats-Msg-Id": event_id})
            return sent_at
        finally:
            slots.release()

    t0 = time.perf_counter()
    tasks = []
    for n in range(count):
        if rate_per_s:
            due_s = t0 + n / rate_per_s - time.perf_counter()
            await asyncio.sleep(max(0.0, min(due_s, deadline - time.monotonic())))
        await slots.acquire()
        if time.monotonic() >= deadline:
            result.failures["not published before the deadline"] += count - n
            break
        tasks.append(asyncio.create_task(one(n)))
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(outcome, BaseException):
            if not isinstance(outcome, (nats.errors.Error, asyncio.TimeoutError)):
                raise outcome  # a bug in the driver should not pass silently
            result.failures[f"publish {type(outcome).__name__}"] += 1
        else:
            result.sent_at.append(outcome)
    result.wall_s = time.perf_counter() - t0
    return result


# --- counting run ends from the lifecycle events -------------------------------------------


class Ends:
    """Runs that ended, from `baton.run.events.<status>`: {run_id: (status, arrival wall time)}.

    A lifecycle event may be delivered twice (the outbox republishes after a failed
    delete; the stream dedupes, a core subscriber does not), so runs are counted once.
    """

    def __init__(self) -> None:
        self.seen: dict[str, tuple[str, float]] = {}
        self.ignored: set[str] = set()
        self.expected = math.inf
        self.done = asyncio.Event()

    def on_message(self, msg: Any) -> None:
        arrived = time.time()
        try:
            run_id = json.loads(msg.data)["data"]["run_id"]
        except (ValueError, KeyError, TypeError):
            return
        if run_id in self.ignored or run_id in self.seen:
            return
        self.seen[run_id] = (msg.subject.rsplit(".", 1)[1], arrived)
        self.check()

    def check(self) -> None:
        if len(self.seen) >= self.expected:
            self.done.set()

    def next_phase(self, expected: int) -> None:
        """Forget the runs seen so far (and any later copy of their events); count `expected` new ones."""
        self.ignored |= self.seen.keys()
        self.seen = {}
        self.expected = expected
        self.done.clear()
        self.check()


# --- the phases -----------------------------------------------------------------------------


@dataclass
class Phase:
    published: Published
    ends: dict[str, tuple[str, float]]
    finished: bool


async def run_phase(js: Any, ends: Ends, tag: str, count: int, args: argparse.Namespace, deadline: float) -> Phase:
    """Publish `count` events and wait, until `deadline` (monotonic), for as many runs to end."""
    ends.next_phase(count)
    published = await publish(js, tag, count, args.window, args.rate, deadline)
    ends.expected = published.acked  # a refused publish starts no run
    ends.check()
    finished = await harness.wait_set(ends.done, deadline)
    return Phase(published, dict(ends.seen), finished)


async def wait_stream(js: Any) -> None:
    deadline = time.monotonic() + STREAM_WAIT_S
    while True:
        try:
            await js.stream_info(STREAM)
            return
        except (nats.errors.Error, asyncio.TimeoutError) as exc:
            if time.monotonic() >= deadline:
                raise harness.ServerError(f"stream {STREAM} not there after {STREAM_WAIT_S:g}s: {exc!r}") from None
        await asyncio.sleep(STREAM_POLL_S)


# --- reading the runs back --------------------------------------------------------------------


def parse_time(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def run_details(base: str, run_ids: list[str]) -> tuple[list[dict[str, Any]], Counter[str]]:
    """GET /v1/runs/{id} for each run, a few at a time."""
    failures: Counter[str] = Counter()
    details: list[dict[str, Any]] = []
    gate = asyncio.Semaphore(DETAIL_CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=harness.REQUEST_TIMEOUT_S)

    async def one(http: aiohttp.ClientSession, run_id: str) -> None:
        async with gate:
            try:
                async with http.get(f"{base}/v1/runs/{run_id}") as resp:
                    if resp.status != 200:
                        failures[f"detail HTTP {resp.status}"] += 1
                        return
                    details.append(await resp.json())
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                failures[f"detail {type(exc).__name__}"] += 1

    async with aiohttp.ClientSession(timeout=timeout) as http:
        tasks = [asyncio.create_task(one(http, run_id)) for run_id in run_ids]
        _, pending = await asyncio.wait(tasks, timeout=DETAILS_TIMEOUT_S)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if pending:
        failures[f"detail not read within {DETAILS_TIMEOUT_S:.0f}s"] += len(pending)
    return details, failures


def first_step_latency_s(detail: dict[str, Any]) -> float | None:
    started = [parse_time(s["started_at"]) for s in detail.get("steps", []) if s.get("started_at")]
    sent_at = (detail.get("input") or {}).get("sent_at")
    if not started or not isinstance(sent_at, (int, float)):
        return None
    return min(started) - sent_at


def prefixed(prefix: str, figures: dict[str, Any]) -> dict[str, Any]:
    return {f"{prefix}{key}": value for key, value in figures.items()}


def span_s(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start


def rate(count: int, seconds: float | None) -> float | None:
    return round(count / seconds, 1) if seconds and seconds > 0 else None


def phase_figures(phase: Phase, details: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput and latency of the measured phase; the failures are counted by the caller.
    Rates count the runs seen (all N when every run succeeded), so a partial run is not inflated."""
    first_sent = min(phase.published.sent_at, default=None)
    succeeded = [(rid, at) for rid, (status, at) in phase.ends.items() if status == "succeeded"]
    last_end = max((at for _, at in succeeded), default=None)
    created = [parse_time(d["created_at"]) for d in details if d.get("created_at")]
    last_created = max(created, default=None)
    by_input: dict[str, float] = {d["run_id"]: d["input"]["sent_at"] for d in details
                                  if isinstance((d.get("input") or {}).get("sent_at"), (int, float))}
    e2e = [at - by_input[rid] for rid, at in succeeded if rid in by_input]
    finished = {d["run_id"]: parse_time(d["finished_at"]) for d in details if d.get("finished_at")}
    lag = [at - finished[rid] for rid, at in succeeded if rid in finished]
    starts = [lat for lat in map(first_step_latency_s, details) if lat is not None]
    committed_s, wall_s = span_s(first_sent, last_created), span_s(first_sent, last_end)
    return {
        "publish_s": round(phase.published.wall_s, 3),
        "publish_per_s": rate(phase.published.acked, phase.published.wall_s),
        "committed_s": None if committed_s is None else round(committed_s, 3),
        "events_per_s": rate(len(created), committed_s),
        "wall_s": None if wall_s is None else round(wall_s, 3),
        "end_to_end_per_s": rate(len(succeeded), wall_s),
        # publish → first step started (the headline latency)
        **harness.latency_figures(starts, QUANTILES),
        # publish → `succeeded` lifecycle event received here
        **prefixed("e2e_", harness.latency_figures(e2e, QUANTILES)),
        # run finished (committed) → its lifecycle event received: the outbox's delay
        **{k: v for k, v in prefixed("outbox_lag_", harness.latency_figures(lag, QUANTILES)).items()
           if k in ("outbox_lag_p50_ms", "outbox_lag_p99_ms")},
    }


# --- wiring -------------------------------------------------------------------------------------


@contextlib.contextmanager
def nats_server(keep_dir: bool) -> Iterator[EmbeddedNats]:
    store_dir = Path(tempfile.mkdtemp(prefix="baton-bench-nats-"))  # not TemporaryDirectory: see harness
    try:
        embedded = EmbeddedNats(store_dir)
        try:
            embedded.start()
        except BusError as exc:
            raise harness.ServerError(f"nats-server did not start: {exc}") from None
        try:
            yield embedded
        finally:
            embedded.stop()
    finally:
        if keep_dir:
            harness.out.print(f"kept {store_dir} (nats-server store and log)", highlight=False)
        else:
            shutil.rmtree(store_dir, ignore_errors=True)


async def drive(args: argparse.Namespace, server: harness.Server, nats_pid: int | None, url: str,
                count: int) -> dict[str, Any]:
    """Warm up, then the measured phase; returns every figure."""
    deadline = time.monotonic() + args.deadline
    tag = uuid.uuid4().hex[:8]  # event ids unique to this invocation
    try:
        nc = await nats.connect(url, connect_timeout=NATS_CONNECT_TIMEOUT_S, max_reconnect_attempts=3)
    except (nats.errors.Error, OSError, asyncio.TimeoutError) as exc:
        raise harness.ServerError(f"cannot connect to nats-server at {url}: {exc!r}") from None
    try:
        js = nc.jetstream(timeout=PUBLISH_TIMEOUT_S)
        await wait_stream(js)
        ends = Ends()
        for subject in END_SUBJECTS:
            await nc.subscribe(subject, cb=_sync_cb(ends.on_message))
        await nc.flush(timeout=CLOSE_TIMEOUT_S)
        if args.warmup:
            warm = await run_phase(js, ends, f"{tag}-warm", args.warmup, args, deadline)
            bad = {s for s, _ in warm.ends.values()} - {"succeeded"}
            if warm.published.failures or not warm.finished or bad:
                raise harness.ServerError(
                    f"warm-up failed: {dict(warm.published.failures)}, {len(warm.ends)}/{args.warmup} runs ended"
                    f" ({sorted(bad)} among them)\n{server.log_tail()}")
        rss_start, cpu_start = server.rss_kib(), server.cpu_s()
        nats_cpu_start = harness.proc_cpu_s(nats_pid) if nats_pid else None
        client_cpu_start = time.process_time()
        profiling = harness.py_spy(server.pid, args.py_spy) if args.py_spy else contextlib.nullcontext()
        with profiling:
            phase = await run_phase(js, ends, tag, count, args, deadline)
        load_figures = harness.server_figures(server, rss_start, cpu_start, len(phase.ends))
        nats_cpu = harness.proc_cpu_s(nats_pid) if nats_pid else None
        client_cpu_s = time.process_time() - client_cpu_start
    finally:
        with contextlib.suppress(asyncio.TimeoutError, nats.errors.Error):
            await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT_S)

    details, detail_failures = await run_details(server.url, list(phase.ends))
    failures = phase.published.failures + detail_failures
    failures.update(f"run {status}" for status, _ in phase.ends.values() if status != "succeeded")
    missing = phase.published.acked - len(phase.ends)
    if missing > 0:
        failures[f"not finished within {args.deadline:.0f}s"] += missing
    return {
        "workload": "events",
        "events": count,
        "window": args.window,
        "rate": args.rate,
        "sync": args.sync,
        "warmup": args.warmup,
        "succeeded": sum(1 for status, _ in phase.ends.values() if status == "succeeded"),
        "failures": sum(failures.values()),
        "failure_kinds": dict(failures),
        **phase_figures(phase, details),
        **load_figures,
        "nats_cpu_s": None if nats_cpu is None or nats_cpu_start is None else round(nats_cpu - nats_cpu_start, 3),
        "client_cpu_s": round(client_cpu_s, 3),
        "server_pid": server.pid,
        **harness.environment(),
    }


def _sync_cb(handler: Any) -> Any:
    """nats-py wants a coroutine callback; the handler itself never awaits."""
    async def cb(msg: Any) -> None:
        handler(msg)
    return cb


def main(args: argparse.Namespace) -> int:
    count = QUICK_EVENTS if args.quick else args.events
    with nats_server(args.keep_dir) as embedded:
        with harness.start_server({"events.yaml": WORKFLOW_YAML}, sync=args.sync,
                                  python_args=harness.server_python_args(args), keep_dir=args.keep_dir,
                                  extra_env={"BATON_NATS_URL": embedded.url}) as server:
            figures = asyncio.run(drive(args, server, embedded.pid, embedded.url, count))
    harness.report(f"events: {count} events, {args.window} publishes in flight, sqlite {args.sync}", figures)
    return 0 if figures["failures"] == 0 else 1
