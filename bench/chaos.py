"""chaos: SIGKILL the server at random moments under a mixed load, then check what survived.

A nats-server of the bench's own, the server (`python -m server serve`, handlers from
bench/chaos_handlers.py) and one `baton worker` for the queue `chaos` run for the
whole loop. The driver keeps up a steady mix of runs: the 3-step chain, an order
saga that fails at a step named in its input (`fail_at`, drawn from the seed) and
compensates, approval waits ended by signals, 1-3 s sleeps (`wait_until`), a step on
the remote worker, and runs started by JetStream events. Between starts it SIGKILLs
the server at moments drawn from the seed; while no server runs it checks the
database (`PRAGMA integrity_check`, read-only) and then starts the server again on
the same directory. A start cut short by a kill is looked up by its `workflow_id`
and made again only if the store has no such run; approvals (half over HTTP, half by
NATS request/reply) are re-sent until the run shows the signal taken.

When the kills are done, every waiting run is signalled, the driver waits until
every run is terminal and the outbox is empty, and then checks from the store, the
handlers' own log (one line per invocation, written before the handler does
anything, so it survives the kill) and the lifecycle stream:

- every run is terminal, and its status is the one its input asks for;
- one run per `workflow_id` and per event (also for events published twice without
  a `Nats-Msg-Id`, which only Baton's own dedupe catches);
- each succeeded task step has one recorded result;
- handler invocations per step <= attempts recorded + kills that hit the step
  (at-least-once, bounded), and no invocation of an attempt that was never recorded;
- a failed saga compensated exactly its succeeded steps, in reverse order;
- every lifecycle event (run started and ended, step ended) is in the stream,
  deduplicated by id.

With `--replicas N --db postgres` the same loop runs against a cluster (server/cluster.py):
replicas r1..rN on one fresh PostgreSQL database (BATON_TEST_POSTGRES_URL's server, or
an embedded one) with a short cluster lease (`--lease-s`). The driver spreads its calls
over the live replicas, and a call cut short by a kill is made again on another. Each
kill SIGKILLs one replica drawn from the seed, often the one holding the `time` lease
(timers, schedules), and starts it again under its name while the others run on and
take its work over. The checks are the same, read from PostgreSQL; SQLite's integrity
check has no counterpart there and is reported as n/a.

Prints the table of checks, then one JSON line; exits 1 if any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import nats
import nats.errors
from rich.table import Table

from bench import harness, replicas
from bench.events import nats_server

QUEUE = "chaos"
HANDLER_MODULES = ["bench.chaos_handlers"]
EVENT_SUBJECT = "chaos.events.created"
EVENT_SOURCE = "/bench/chaos"
SAGA_STEPS = ("reserve", "charge", "ship")

# Retries are short so a flaky saga step finishes between two kills; the remote step's
# heartbeat is short so an attempt lost with a worker's report is retried soon.
WORKFLOWS = {
    "chain.yaml": """\
name: chaos-chain
steps:
  - {id: a, task: chaos.step, input: {work_ms: "{{ input.work_ms }}"}}
  - {id: b, task: chaos.step, input: {work_ms: "{{ input.work_ms }}"}}
  - {id: c, task: chaos.step, input: {work_ms: "{{ input.work_ms }}"}}
""",
    "saga.yaml": """\
name: chaos-saga
defaults:
  retry: {max_attempts: 3, initial_delay: 100ms, multiplier: 2, max_delay: 1s}
steps:
""" + "".join(f"""\
  - id: {step}
    task: chaos.saga
    input: {{fail_at: "{{{{ input.fail_at }}}}", flaky: "{{{{ input.flaky }}}}", work_ms: "{{{{ input.work_ms }}}}"}}
    compensate: {{task: chaos.undo}}
""" for step in SAGA_STEPS),
    "approval.yaml": """\
name: chaos-approval
steps:
  - {id: a, task: chaos.step, input: {work_ms: "{{ input.work_ms }}"}}
  - {id: approve, wait_for_signal: {signal: approve, timeout: 1h}}
  - {id: b, task: chaos.step, input: {work_ms: "{{ input.work_ms }}"}}
""",
    "sleep.yaml": """\
name: chaos-sleep
steps:
  - {id: a, task: chaos.step, input: {work_ms: "{{ input.work_ms }}"}}
  - {id: nap, wait_until: "{{ input.at }}"}
  - {id: b, task: chaos.step, input: {work_ms: "{{ input.work_ms }}"}}
""",
    "remote.yaml": f"""\
name: chaos-remote
steps:
  - {{id: a, task: chaos.step, input: {{work_ms: "{{{{ input.work_ms }}}}"}}}}
  - id: r
    task: chaos.step
    queue: {QUEUE}
    heartbeat: 3s
    retry: {{max_attempts: 5, initial_delay: 100ms}}
    input: {{work_ms: "{{{{ input.work_ms }}}}"}}
  - {{id: b, task: chaos.step, input: {{work_ms: "{{{{ input.work_ms }}}}"}}}}
""",
    "event.yaml": """\
name: chaos-event
triggers:
  - event:
      subject: "chaos.events.>"
      input: {eid: "{{ event.data.eid }}", work_ms: "{{ event.data.work_ms }}"}
steps:
  - {id: a, task: chaos.step, input: {work_ms: "{{ input.work_ms }}"}}
  - {id: b, task: chaos.step, input: {work_ms: "{{ input.work_ms }}"}}
  - {id: c, task: chaos.step, input: {work_ms: "{{ input.work_ms }}"}}
""",
}
# the steps that run a handler, per workflow (signal and sleep steps record no result)
TASK_STEPS = {
    "chaos-chain": {"a", "b", "c"}, "chaos-saga": set(SAGA_STEPS), "chaos-approval": {"a", "b"},
    "chaos-sleep": {"a", "b"}, "chaos-remote": {"a", "r", "b"}, "chaos-event": {"a", "b", "c"},
}
# how often each kind of run is started (relative weights)
MIX = {"chain": 3, "saga": 3, "approval": 2, "sleep": 2, "remote": 1, "event": 3}
WORKFLOW_OF = {"chain": "chaos-chain", "saga": "chaos-saga", "approval": "chaos-approval",
               "sleep": "chaos-sleep", "remote": "chaos-remote"}


@dataclass(frozen=True)
class Load:
    """How hard the loop pushes: starts per second and the gap between two kills."""

    starts_per_s: float
    kill_gap_s: tuple[float, float]


FULL_LOAD = Load(starts_per_s=20.0, kill_gap_s=(0.5, 2.5))
QUICK_LOAD = Load(starts_per_s=10.0, kill_gap_s=(0.4, 1.2))
QUICK_ITERATIONS = 3
DEFAULT_ITERATIONS = 20
SLEEP_S = (1.0, 3.0)  # how long a sleep run naps
SIGNAL_DELAY_S = (0.2, 2.0)  # an approval is signalled this long after its start
WORK_MS = (0.0, 50.0)  # per handler call
BURST_STARTS = 12  # up to this many starts just before a kill
BURST_LEAD_S = (0.0, 0.06)  # the burst's head start on the kill
FAIL_AT = ("", "", "reserve", "charge", "ship")  # a saga fails at a step 3 times in 5
DUPLICATE_EVENT_SHARE = 0.3  # events published twice without Nats-Msg-Id
NATS_SIGNAL_SHARE = 0.5  # approvals signalled by NATS request/reply; the rest over HTTP
REPOST_SHARE = 0.3  # approval starts POSTed again while the run is open: must return the same run

REQUEST_TIMEOUT_S = 10.0  # one API call; a killed server answers with a reset, not silence
UP_WAIT_S = harness.RESTART_TIMEOUT_S + 10.0  # a call waiting for the restarted server
RETRY_PAUSE_S = 0.2
MAX_TRIES = 200  # per start or signal, across all kills: a bound, not an expectation
FINISH_TIMEOUT_S = 180.0  # every run terminal and the outbox empty after the last kill
FINISH_POLL_S = 0.25
WORKER_READY_S = 20.0
NATS_TIMEOUT_S = 10.0
NATS_SIGNAL_TIMEOUT_S = 2.0  # a reply comes in milliseconds; none means nobody listened
FETCH_BATCH = 512
EXAMPLES = 5  # offenders named per failed check
# A cluster's lease is short so that a killed replica's work moves within the loop's gaps
# between kills (the server's default of 10 s would outlast most of them).
LEASE_S = 2.0
LEADER_SHARE = 0.4  # a kill aims at the time leader this often; the other draws may land on it too


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS,
                        help=f"server kills (default: {DEFAULT_ITERATIONS})")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: drawn, and printed)")
    parser.add_argument("--quick", action="store_true",
                        help=f"{QUICK_ITERATIONS} kills under a lighter load, for CI")
    parser.add_argument("--keep-dir", action="store_true",
                        help="keep the server's and nats-server's temporary directories")
    parser.add_argument("--sync", choices=("normal", "full"), default="normal",
                        help="SQLite synchronous mode of the server (default: normal)")
    parser.add_argument("--db", choices=("sqlite", "postgres"), default="sqlite",
                        help="the store: sqlite (one server), or postgres (replicas; see --replicas)")
    parser.add_argument("--replicas", type=int, default=1,
                        help="with --db postgres: replicas sharing the database, one killed at a time (default: 1)")
    parser.add_argument("--lease-s", type=float, default=LEASE_S,
                        help=f"with --db postgres: the replicas' cluster lease (default: {LEASE_S:g})")
    parser.set_defaults(warmup=0)  # bench/__main__.py checks every workload's --warmup


# --- what the driver did --------------------------------------------------------------------


@dataclass
class Ledger:
    """The driver's side of the story, compared with the store's at the end."""

    kills: list[float] = field(default_factory=list)  # wall time once each killed server had exited
    # PRAGMA integrity_check after each kill; None on PostgreSQL, which has no such check
    integrity: list[str] | None = field(default_factory=list)
    victims: list[str] = field(default_factory=list)  # the replica each kill hit
    leader_kills: int = 0  # kills of the replica holding the time lease at that moment
    restarts_s: list[float] = field(default_factory=list)  # spawn -> /readyz of each restart
    answered: dict[str, str] = field(default_factory=dict)  # workflow_id -> run_id the API answered
    reposts: list[tuple[str, str, str]] = field(default_factory=list)  # (workflow_id, first, second run)
    events: set[str] = field(default_factory=set)  # event ids published (acked by the stream)
    retried_starts: int = 0  # starts cut short by a kill
    retried_signals: int = 0
    given_up: Counter[str] = field(default_factory=Counter)


# --- the checks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    name: str
    figure: str
    ok: bool
    examples: tuple[str, ...] = ()  # a few offenders (run and step), printed under the table
    applies: bool = True  # False: nothing to check on this store (reported as n/a, not as a pass)


@dataclass
class Facts:
    """Everything the checks read: plain rows, so a test can fabricate them."""

    runs: list[dict[str, Any]]  # run_id, workflow, workflow_id, status, input
    steps: list[dict[str, Any]]  # run_id, key, step_id, status, attempt, finished_at
    history: list[dict[str, Any]]  # run_id, seq, type, key, task_id (seq order per run)
    log: list[dict[str, Any]]  # handler lines: run, step, attempt, key, kind, t
    lifecycle_ids: set[str]
    lifecycle_copies: int  # messages read from the stream, before dedupe by id
    outbox_left: int
    ledger: Ledger


def expected_status(run: dict[str, Any]) -> str:
    """A saga that fails at a later step compensates; one that fails at its first step has
    nothing to undo and ends `failed`; every other run succeeds."""
    fail_at = (run.get("input") or {}).get("fail_at") if run["workflow"] == "chaos-saga" else None
    if not fail_at:
        return "succeeded"
    return "failed" if fail_at == SAGA_STEPS[0] else "compensated"


def check_integrity(f: Facts) -> Check:
    if f.ledger.integrity is None:
        return Check("integrity_check after each kill", "n/a on PostgreSQL", True, applies=False)
    bad = [r for r in f.ledger.integrity if r != "ok"]
    return Check("integrity_check after each kill", f"{len(f.ledger.integrity) - len(bad)}/{len(f.ledger.integrity)} ok",
                 not bad and len(f.ledger.integrity) == len(f.ledger.kills))


def check_terminal(f: Facts) -> Check:
    open_runs = [f"{r['run_id']} {r['workflow_id']}: {r['status']}" for r in f.runs if r["status"] not in harness.TERMINAL]
    wrong = [f"{r['run_id']} {r['workflow_id']}: {r['status']}, expected {expected_status(r)}" for r in f.runs
             if r["status"] in harness.TERMINAL and r["status"] != expected_status(r)]
    return Check("every run terminal, as its input asks",
                 f"{len(f.runs) - len(open_runs)}/{len(f.runs)} terminal, {len(wrong)} wrong status",
                 not open_runs and not wrong and bool(f.runs), tuple((open_runs + wrong)[:EXAMPLES]))


def check_workflow_ids(f: Facts) -> Check:
    by_id: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in f.runs:
        if r["workflow_id"] is not None:
            by_id[(r["workflow"], r["workflow_id"])].append(r["run_id"])
    twice = sum(1 for ids in by_id.values() if len(ids) > 1)
    stored = {wid: ids for (_, wid), ids in by_id.items()}
    lost = sum(1 for wid, run_id in f.ledger.answered.items() if stored.get(wid) != [run_id])
    split = sum(1 for _, first, second in f.ledger.reposts if first != second)
    return Check("one run per workflow_id",
                 f"{len(by_id)} ids, {twice} started twice, {lost} answered but not stored, "
                 f"{len(f.ledger.reposts) - split}/{len(f.ledger.reposts)} re-POSTs got the same run",
                 not twice and not lost and not split)


def check_events(f: Facts) -> Check:
    by_event = Counter((r.get("input") or {}).get("eid") for r in f.runs if r["workflow"] == "chaos-event")
    twice = sum(1 for n in by_event.values() if n > 1)
    missing = len(f.ledger.events - by_event.keys())
    unknown = len(by_event.keys() - f.ledger.events)
    return Check("one run per event", f"{len(f.ledger.events)} events, {twice} started twice, {missing} without a run, "
                 f"{unknown} runs of no event", not twice and not missing and not unknown)


def step_results(f: Facts) -> list[tuple[str, str]]:
    """(run, key) of each step result the engine took. A compensation's result is recorded as
    `task.succeeded` too, told apart by its task id (`<run>:<key>:compensate:<n>`). A result
    delivered again (a replica killed before it acked the message) is recorded as well, and
    `task.ignored` right after it says it changed nothing (server/engine/decide.py, rule 6)."""
    results = []
    for h, after in zip(f.history, [*f.history[1:], None]):
        if h["type"] != "task.succeeded" or ":compensate:" in (h.get("task_id") or ""):
            continue
        if (after is not None and after["type"] == "task.ignored" and after["run_id"] == h["run_id"]
                and after["task_id"] == h["task_id"]):
            continue
        results.append((h["run_id"], h["key"]))
    return results


def _task_keys(f: Facts) -> dict[tuple[str, str], dict[str, Any]]:
    workflow = {r["run_id"]: r["workflow"] for r in f.runs}
    return {(s["run_id"], s["key"]): s for s in f.steps
            if s["step_id"] in TASK_STEPS.get(workflow.get(s["run_id"], ""), ())}


def check_recorded_once(f: Facts) -> Check:
    results = Counter(step_results(f))
    tasks = _task_keys(f)
    twice = [f"{run} {key}: {n} results" for (run, key), n in results.items() if n > 1]
    # a task step that ended succeeded (or was compensated later) has a result
    unrecorded = [f"{k[0]} {k[1]}: {s['status']} without a result" for k, s in tasks.items()
                  if s["status"] in ("succeeded", "compensated") and not results[k]]
    return Check("each succeeded step's result recorded once",
                 f"{sum(results.values())} results, {len(twice)} recorded twice, {len(unrecorded)} succeeded without one",
                 not twice and not unrecorded, tuple((twice + unrecorded)[:EXAMPLES]))


def kills_between(kills: list[float], start: float, end: float | None) -> int:
    return sum(1 for t in kills if start <= t and (end is None or t <= end))


def check_invocations(f: Facts) -> Check:
    """Per step: invocations <= attempts recorded + kills between its first invocation and its end."""
    tasks = _task_keys(f)
    calls: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for line in f.log:
        if line["kind"] == "invoke":
            calls[(line["run"], line["step"])].append(line)
    phantom = silent = extra = 0
    over: list[str] = []
    for key, lines in calls.items():
        step = tasks.get(key)
        if step is None:
            phantom += len(lines)  # an invocation of a step the store never scheduled
            continue
        attempts = step["attempt"]
        hits = kills_between(f.ledger.kills, min(x["t"] for x in lines), step.get("finished_at"))
        extra += max(0, len(lines) - attempts)
        if len(lines) > attempts + hits:
            over.append(f"{key[0]} {key[1]}: {len(lines)} calls, {attempts} attempts, {hits} kills")
        phantom += sum(1 for x in lines if x["attempt"] > attempts)
    # a recorded success must come from an invocation this log saw
    silent = sum(1 for k, s in tasks.items() if s["status"] in ("succeeded", "compensated") and k not in calls)
    total = sum(len(v) for v in calls.values())
    return Check("invocations <= attempts + kills that hit the step",
                 f"{total} invocations, {extra} repeats, {len(over)} steps over the bound, {phantom} of "
                 f"unrecorded attempts, {silent} results never invoked", not over and not phantom and not silent,
                 tuple(over[:EXAMPLES]))


def check_compensations(f: Facts) -> Check:
    done: dict[str, list[str]] = defaultdict(list)  # run -> succeeded task steps, in the order they succeeded
    comp_order: dict[str, list[str]] = defaultdict(list)  # run -> compensation.succeeded, in history order
    for run_id, key in step_results(f):  # history order
        if key not in done[run_id]:
            done[run_id].append(key)
    for h in f.history:
        if h["type"] == "compensation.succeeded":
            comp_order[h["run_id"]].append(h["key"])
    ran: dict[str, list[str]] = defaultdict(list)  # run -> steps the undo handler was invoked for (first call)
    calls: dict[tuple[str, str], list[float]] = defaultdict(list)
    for line in f.log:
        if line["kind"] == "compensate":
            calls[(line["run"], line["step"])].append(line["t"])
            if line["step"] not in ran[line["run"]]:
                ran[line["run"]].append(line["step"])
    # at-least-once for compensations too: calls <= attempts scheduled + kills since the first call
    scheduled = Counter((h["run_id"], h["key"]) for h in f.history if h["type"] == "compensation.scheduled")
    over = sum(1 for key, ts in calls.items()
               if len(ts) > scheduled[key] + kills_between(f.ledger.kills, min(ts), None))
    wrong: list[str] = []
    compensated = 0
    for r in f.runs:
        rid = r["run_id"]
        if r["status"] == "compensated":
            compensated += 1
            expected = list(reversed(done[rid]))
            if comp_order[rid] != expected or ran[rid] != expected:
                wrong.append(f"{rid}: undid {comp_order[rid]} (handler {ran[rid]}), expected {expected}")
        elif ran[rid] or comp_order[rid]:
            wrong.append(f"{rid} {r['status']}: undid {comp_order[rid]} (handler {ran[rid]})")
    return Check("compensations: succeeded steps of failed runs, reverse order",
                 f"{compensated} runs compensated, {len(wrong)} wrong, {sum(map(len, calls.values()))} undo calls, "
                 f"{over} steps over the bound", not wrong and not over, tuple(wrong[:EXAMPLES]))


def expected_lifecycle(f: Facts) -> set[str]:
    """Event ids (server/runtime/lifecycle.py) every run must have published: started and its end
    (run attempt 1: the loop never retries runs), and each step's end at its last attempt."""
    ids = set()
    for r in f.runs:
        ids.add(f"{r['run_id']}:started:1")
        ids.add(f"{r['run_id']}:{r['status']}:1")
    succeeded = set(step_results(f))
    for s in f.steps:
        status = s["status"]
        if status == "compensated" or (s["run_id"], s["key"]) in succeeded:
            status = "succeeded"  # its succeeded event went out before the compensation
        if status in ("succeeded", "failed", "skipped", "cancelled"):
            ids.add(f"{s['run_id']}:{s['key']}:{status}:1:{s['attempt']}")
    return ids


def check_lifecycle(f: Facts) -> Check:
    expected = expected_lifecycle(f)
    missing = expected - f.lifecycle_ids
    return Check("every lifecycle event published",
                 f"{len(expected) - len(missing)}/{len(expected)} published ({f.lifecycle_copies} messages), "
                 f"{f.outbox_left} left in the outbox", not missing and not f.outbox_left)


CHECKS = (check_integrity, check_terminal, check_workflow_ids, check_events, check_recorded_once,
          check_invocations, check_compensations, check_lifecycle)


def run_checks(f: Facts) -> list[Check]:
    return [check(f) for check in CHECKS]


# --- reading the store, the handler log, the lifecycle stream -----------------------------------


# The same queries on both stores: a step's task id is read from its JSON in Python, since
# SQLite's json_extract and PostgreSQL's operators differ and the rows are few.
RUNS_SQL = "SELECT run_id, workflow, workflow_id, status, data FROM runs"
STEPS_SQL = "SELECT run_id, key, step_id, status, attempt, finished_at FROM steps"
HISTORY_SQL = "SELECT run_id, seq, type, key, data FROM history ORDER BY run_id, seq"
OUTBOX_SQL = "SELECT count(*) FROM outbox"
OPEN_RUNS_SQL = "SELECT count(*) FROM runs WHERE status NOT IN ('succeeded', 'failed', 'compensated', 'cancelled')"
EVENT_RUNS_SQL = "SELECT count(*) FROM runs WHERE workflow = 'chaos-event'"


class SqliteFile:
    """The single server's database file, read beside it on a read-only connection."""

    checks_integrity = True

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30.0)
        try:
            yield conn
        finally:
            conn.close()

    def integrity_check(self) -> str:
        with self._connect() as conn:
            rows = conn.execute("PRAGMA integrity_check").fetchall()
        return "; ".join(str(r[0]) for r in rows)

    def _fetch(self, sqls: tuple[str, ...]) -> list[list[tuple[Any, ...]]]:
        with self._connect() as conn:
            return [conn.execute(sql).fetchall() for sql in sqls]

    async def fetch(self, *sqls: str) -> list[list[tuple[Any, ...]]]:
        return await asyncio.to_thread(self._fetch, sqls)

    async def time_leader(self) -> str | None:
        return None  # one server: no lease to hold


class PostgresDatabase:
    """The replicas' shared database."""

    checks_integrity = False  # PostgreSQL has no counterpart of PRAGMA integrity_check to run here

    def __init__(self, url: str) -> None:
        self.url = url

    async def fetch(self, *sqls: str) -> list[list[tuple[Any, ...]]]:
        conn = await asyncpg.connect(self.url)
        try:
            return [[tuple(row) for row in await conn.fetch(sql)] for sql in sqls]
        finally:
            await conn.close()

    async def time_leader(self) -> str | None:
        """The replica holding the `time` lease (its holder is `<replica>/<process nonce>`)."""
        [rows] = await self.fetch("SELECT holder FROM leases WHERE name = 'time'")
        return rows[0][0].partition("/")[0] if rows else None


Database = SqliteFile | PostgresDatabase


async def read_store(db: Database) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], int]:
    runs, steps, history, outbox = await db.fetch(RUNS_SQL, STEPS_SQL, HISTORY_SQL, OUTBOX_SQL)
    return (
        [{"run_id": rid, "workflow": wf, "workflow_id": wid, "status": st, "input": json.loads(data).get("input")}
         for rid, wf, wid, st, data in runs],
        [{"run_id": rid, "key": key, "step_id": sid, "status": st, "attempt": att, "finished_at": fin}
         for rid, key, sid, st, att, fin in steps],
        [{"run_id": rid, "seq": seq, "type": typ, "key": key, "task_id": json.loads(data).get("task_id")}
         for rid, seq, typ, key, data in history],
        outbox[0][0],
    )


async def settled(db: Database, events: int) -> tuple[bool, str]:
    """Whether every run is terminal, every event has its run and the outbox is empty."""
    [[(open_runs,)], [(event_runs,)], [(outbox,)]] = await db.fetch(OPEN_RUNS_SQL, EVENT_RUNS_SQL, OUTBOX_SQL)
    return (not open_runs and event_runs >= events and not outbox,
            f"{open_runs} runs open, {event_runs}/{events} event runs, {outbox} outbox rows")


def read_log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def read_lifecycle(js: Any) -> tuple[set[str], int]:
    """Every CloudEvent id in the stream BATON_LIFECYCLE, and how many messages held them."""
    ids: set[str] = set()
    copies = 0
    for subject in ("baton.run.>", "baton.step.>"):
        sub = await js.pull_subscribe(subject, stream="BATON_LIFECYCLE")
        try:
            while True:
                try:
                    msgs = await sub.fetch(FETCH_BATCH, timeout=1.0)
                except asyncio.TimeoutError:
                    break
                for msg in msgs:
                    ids.add(json.loads(msg.data)["id"])
                    copies += 1
                    await msg.ack()
                if msgs[-1].metadata.num_pending == 0:
                    break
        finally:
            await sub.unsubscribe()
    return ids, copies


# --- the worker process ---------------------------------------------------------------------------


@contextlib.contextmanager
def worker(workdir: Path, nats_url: str, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m server worker --queue chaos`, ready once it says it serves its queue."""
    log_path = workdir / "worker.log"
    config = workdir / "worker.yaml"
    config.write_text("{}\n")
    cmd = [sys.executable, "-m", "server", "worker", "--queue", QUEUE, "--handlers", *HANDLER_MODULES,
           "--nats-url", nats_url]
    wenv = {**{k: v for k, v in env.items() if not k.startswith("BATON_")}, "BATON_CONFIG": str(config),
            "BATON_LOG_LEVEL": "INFO", "BATON_WORKER__NAME": "chaos-worker"}
    with log_path.open("ab") as log:
        proc = subprocess.Popen(cmd, cwd=harness.REPO_ROOT, env=wenv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + WORKER_READY_S
        while "serving queues" not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise harness.ServerError(f"worker not ready:\n{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(harness.HEALTH_POLL_S)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(harness.SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(harness.KILL_TIMEOUT_S)


# --- the driver -------------------------------------------------------------------------------------


class Driver:
    """Starts the mix of runs and signals the approvals, riding out the kills: each call goes
    to the next live server in turn (as a load balancer would), and a call that meets a dead
    one tries again on the next, waiting while none is up (the single server's restart)."""

    def __init__(self, servers: list[harness.Server], http: aiohttp.ClientSession, nc: Any, rng: random.Random,
                 ledger: Ledger) -> None:
        self.servers = servers
        self.http = http
        self.nc = nc
        self.js = nc.jetstream(timeout=NATS_TIMEOUT_S)
        self.rng = rng
        self.ledger = ledger
        self.down: set[int] = set()  # servers killed and not ready again
        self.up = asyncio.Event()  # set while any server is up
        self.up.set()
        self.turn = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.count = 0

    def mark_down(self, i: int) -> None:
        self.down.add(i)
        if len(self.down) == len(self.servers):
            self.up.clear()

    def mark_up(self, i: int) -> None:
        self.down.discard(i)
        self.up.set()

    async def server(self) -> harness.Server:
        await asyncio.wait_for(self.up.wait(), UP_WAIT_S)
        live = [s for i, s in enumerate(self.servers) if i not in self.down]
        self.turn += 1
        return live[self.turn % len(live)]

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """One API call to a live server; ConnectionError if it went away meanwhile."""
        server = await self.server()
        try:
            async with self.http.request(method, f"{server.url}{path}", json=body) as resp:
                return resp.status, await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise ConnectionError(repr(exc)) from None

    def start_one(self) -> None:
        kinds = list(MIX)
        kind = self.rng.choices(kinds, weights=[MIX[k] for k in kinds])[0]
        n = self.count = self.count + 1
        work_ms = round(self.rng.uniform(*WORK_MS), 1)
        if kind == "event":
            twice = self.rng.random() < DUPLICATE_EVENT_SHARE
            self.spawn(self.publish(f"ev-{n}", work_ms, twice, self.rng.uniform(0.1, 1.5)))
            return
        wid = f"{kind}-{n}"
        payload: dict[str, Any] = {"work_ms": work_ms}
        if kind == "saga":
            payload.update(fail_at=self.rng.choice(FAIL_AT), flaky=self.rng.random() < 0.3)
        elif kind == "sleep":
            payload["at"] = round(time.time() + self.rng.uniform(*SLEEP_S), 3)
        signal_after = self.rng.uniform(*SIGNAL_DELAY_S) if kind == "approval" else None
        repost = kind == "approval" and self.rng.random() < REPOST_SHARE
        via_nats = self.rng.random() < NATS_SIGNAL_SHARE
        self.spawn(self.start(WORKFLOW_OF[kind], wid, payload, signal_after, repost, via_nats))

    async def start(self, workflow: str, wid: str, payload: dict[str, Any], signal_after: float | None,
                    repost: bool, via_nats: bool) -> None:
        run_id = await self.post_start(workflow, wid, payload)
        if run_id is None:
            return
        if repost:
            # still waiting for its signal, so open: a second start must answer the same run
            again = await self.post_start(workflow, wid, payload, look_first=False)
            if again is not None:
                self.ledger.reposts.append((wid, run_id, again))
        if signal_after is not None:
            await asyncio.sleep(signal_after)
            await self.signal(run_id, via_nats)

    async def post_start(self, workflow: str, wid: str, payload: dict[str, Any], look_first: bool = True) -> str | None:
        body = {"input": payload, "workflow_id": wid}
        for tries in range(MAX_TRIES):
            try:
                if tries and look_first:
                    # the cut-short POST may have been committed: never start it twice
                    status, page = await self.call("GET", f"/v1/runs?workflow={workflow}&workflow_id={wid}")
                    if status == 200 and page.get("runs"):
                        run_id = page["runs"][0]["run_id"]
                        self.ledger.answered[wid] = run_id
                        return run_id
                status, run = await self.call("POST", f"/v1/workflows/{workflow}/runs", body)
                if status in (200, 201):
                    self.ledger.answered.setdefault(wid, run["run_id"])
                    return run["run_id"]
                if status < 500:
                    raise harness.ServerError(f"start of {workflow} refused: HTTP {status} {run}")
            except ConnectionError:
                pass
            self.ledger.retried_starts += 1
            await asyncio.sleep(RETRY_PAUSE_S)
        self.ledger.given_up["start"] += 1
        return None

    async def signal(self, run_id: str, via_nats: bool) -> None:
        """Signal `approve` (over HTTP, or by NATS request/reply) until the run shows it taken:
        a refusal may mean already taken before the kill, or not waiting yet."""
        for _ in range(MAX_TRIES):
            try:
                if via_nats:
                    if await self.nats_signal(run_id):
                        return
                else:
                    status, _ = await self.call("POST", f"/v1/runs/{run_id}/signals/approve", {})
                    if status == 202:
                        return
                status, run = await self.call("GET", f"/v1/runs/{run_id}")
                if status == 200 and (run["status"] in harness.TERMINAL or any(
                        s["step_id"] == "approve" and s["status"] not in ("pending", "waiting")
                        for s in run.get("steps", []))):
                    return
            except ConnectionError:
                pass
            self.ledger.retried_signals += 1
            await asyncio.sleep(RETRY_PAUSE_S)
        self.ledger.given_up["signal"] += 1

    async def nats_signal(self, run_id: str) -> bool:
        """True if the server answered that it took the signal; ConnectionError if no answer came
        (no server listening: the request is not delivered later, so it is simply sent again)."""
        await asyncio.wait_for(self.up.wait(), UP_WAIT_S)
        try:
            msg = await self.nc.request(f"baton.signal.{run_id}.approve", b"", timeout=NATS_SIGNAL_TIMEOUT_S)
        except (nats.errors.Error, asyncio.TimeoutError) as exc:
            raise ConnectionError(repr(exc)) from None
        return bool(json.loads(msg.data).get("ok"))

    async def publish(self, eid: str, work_ms: float, twice: bool, gap_s: float) -> None:
        """A CloudEvent on the trigger subject; `twice`: two copies without Nats-Msg-Id, so only
        Baton's own dedupe (CloudEvents source + id) keeps them to one run."""
        body = json.dumps({"specversion": "1.0", "id": eid, "source": EVENT_SOURCE, "type": "chaos.created",
                           "data": {"eid": eid, "work_ms": work_ms}}).encode()
        headers = None if twice else {"Nats-Msg-Id": eid}
        await self.js.publish(EVENT_SUBJECT, body, headers=headers, timeout=NATS_TIMEOUT_S)
        self.ledger.events.add(eid)
        if twice:
            await asyncio.sleep(gap_s)
            await self.js.publish(EVENT_SUBJECT, body, timeout=NATS_TIMEOUT_S)

    async def load(self, stop: asyncio.Event, starts_per_s: float) -> None:
        while not stop.is_set():
            self.start_one()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.rng.expovariate(starts_per_s))

    async def drain(self, timeout_s: float) -> None:
        if self.tasks:
            done, pending = await asyncio.wait(set(self.tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
            for task in done:
                task.result()  # a bug in the driver should not pass silently
            if pending:
                self.ledger.given_up["driver task"] += len(pending)


async def pick_victim(db: Database, names: list[str], rng: random.Random) -> tuple[int, bool]:
    """The server to kill, and whether it holds the time lease. With one server there is no
    choice to draw (the SQLite loop's draws stay as they were for a given seed)."""
    leader = await db.time_leader()
    if len(names) == 1:
        return 0, names[0] == leader
    aim, pick = rng.random(), rng.randrange(len(names))
    if aim < LEADER_SHARE and leader in names:
        pick = names.index(leader)
    return pick, names[pick] == leader


async def kill_loop(driver: Driver, names: list[str], db: Database, iterations: int, load: Load,
                    rng: random.Random) -> None:
    ledger = driver.ledger
    loop = asyncio.get_running_loop()
    for i in range(iterations):
        await asyncio.sleep(rng.uniform(*load.kill_gap_s))
        for _ in range(rng.randrange(BURST_STARTS + 1)):
            driver.start_one()  # a burst, so the kill lands among commits and handler calls
        await asyncio.sleep(rng.uniform(*BURST_LEAD_S))
        victim, leader = await pick_victim(db, names, rng)

        def between(victim: int = victim) -> None:
            # The old process has exited: every handler call it made is in the log before this
            # moment, which is what "a kill that hit the step" compares with. (The time read just
            # before the SIGKILL is too early: the server runs on for a few ms until it lands.)
            ledger.kills.append(time.time())
            # calls made from here on go to the other servers, or wait for this one; those in
            # flight at the kill failed and are retried (a start is first looked up: it may
            # have been committed)
            loop.call_soon_threadsafe(driver.mark_down, victim)
            if ledger.integrity is not None:
                ledger.integrity.append(db.integrity_check())

        restart = await asyncio.to_thread(harness.restart_server, driver.servers[victim], kill=True, between=between)
        ledger.restarts_s.append(restart.ready_s)
        ledger.victims.append(names[victim])
        ledger.leader_kills += leader
        driver.mark_up(victim)
        what = (f"integrity {ledger.integrity[-1]}" if ledger.integrity is not None
                else f"{names[victim]}{' (time leader)' if leader else ''}")
        harness.out.print(f"kill {i + 1}/{iterations}: {what}, "
                          f"ready again in {restart.ready_s:.2f}s, {driver.count} starts so far", highlight=False)


async def chaos(servers: list[harness.Server], names: list[str], db: Database, nats_url: str, log_path: Path,
                seed: int, iterations: int, load: Load) -> tuple[list[Check], dict[str, Any]]:
    rng = random.Random(seed)
    ledger = Ledger(integrity=[] if db.checks_integrity else None)
    nc = await nats.connect(nats_url, connect_timeout=NATS_TIMEOUT_S, max_reconnect_attempts=3)
    try:
        js = nc.jetstream(timeout=NATS_TIMEOUT_S)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            driver = Driver(servers, http, nc, rng, ledger)
            stop = asyncio.Event()
            t0 = time.perf_counter()
            loader = asyncio.create_task(driver.load(stop, load.starts_per_s))
            try:
                await kill_loop(driver, names, db, iterations, load, rng)
            finally:
                stop.set()
                await loader
            await driver.drain(FINISH_TIMEOUT_S)  # the last starts and every approval's signal
            deadline = time.monotonic() + FINISH_TIMEOUT_S
            while True:
                done, state = await settled(db, len(ledger.events))
                if done or time.monotonic() > deadline:
                    break
                await asyncio.sleep(FINISH_POLL_S)
            harness.out.print(f"after the loop: {state}", highlight=False)
            wall_s = time.perf_counter() - t0
        ids, copies = await read_lifecycle(js)
    finally:
        with contextlib.suppress(asyncio.TimeoutError, nats.errors.Error):
            await asyncio.wait_for(nc.close(), 5.0)
    runs, steps, history, outbox = await read_store(db)
    facts = Facts(runs, steps, history, read_log(log_path), ids, copies, outbox, ledger)
    checks = run_checks(facts)
    figures = {
        "workload": "chaos", "seed": seed, "iterations": iterations, "wall_s": round(wall_s, 1),
        "db": "sqlite" if isinstance(db, SqliteFile) else "postgres", "replicas": len(servers),
        "runs": len(runs), "runs_by_status": dict(Counter(r["status"] for r in runs)),
        "runs_by_workflow": dict(Counter(r["workflow"] for r in runs)),
        "handler_calls": len(facts.log), "events": len(ledger.events),
        "retried_starts": ledger.retried_starts, "retried_signals": ledger.retried_signals,
        "given_up": dict(ledger.given_up),
        "restart_ready_max_s": round(max(ledger.restarts_s, default=0.0), 3),
        "checks": {c.name: c.ok if c.applies else None for c in checks}, "failed": sum(1 for c in checks if not c.ok),
    }
    if len(servers) > 1:
        figures.update(kills_by_replica=dict(sorted(Counter(ledger.victims).items())),
                       leader_kills=ledger.leader_kills)
    return checks, figures


def report(checks: list[Check], figures: dict[str, Any], title: str) -> None:
    harness.out.print(f"[bold]{title}[/]", highlight=False)
    table = Table(show_header=True)
    table.add_column("check")
    table.add_column("figure")
    table.add_column("result")
    for c in checks:
        table.add_row(c.name, c.figure, "n/a" if not c.applies else "[green]pass[/]" if c.ok else "[red]FAIL[/]")
    harness.out.print(table)
    for c in checks:
        for example in c.examples:
            harness.out.print(f"{c.name}: {example}", highlight=False, markup=False)
    sys.stdout.flush()
    print(json.dumps(figures, separators=(", ", ": ")), flush=True)


def usage_error(args: argparse.Namespace, iterations: int) -> str | None:
    if iterations < 1:
        return "--iterations must be at least 1"
    if args.replicas < 1:
        return "--replicas must be at least 1"
    if args.replicas > 1 and args.db != "postgres":
        return "--replicas needs --db postgres: replicas share a PostgreSQL database"
    if not 1.0 <= args.lease_s <= 300.0:
        return "--lease-s must be between 1 and 300 (the server's bounds)"
    return None


@contextlib.contextmanager
def cluster(args: argparse.Namespace, env: dict[str, str]) -> Iterator[
        tuple[list[harness.Server], list[str], PostgresDatabase]]:
    """Replicas r1..rN on a fresh database, dropped afterwards unless --keep-dir."""
    with replicas.postgres(args.keep_dir) as pg_url:
        db_url = asyncio.run(replicas.fresh_database(pg_url))
        names = [f"r{i + 1}" for i in range(args.replicas)]
        try:
            with contextlib.ExitStack() as stack:
                yield [stack.enter_context(harness.start_server(WORKFLOWS, keep_dir=args.keep_dir, extra_env={
                    **env, "BATON_DB": db_url, "BATON_CLUSTER__REPLICA": name,
                    "BATON_CLUSTER__LEASE_S": f"{args.lease_s:g}"})) for name in names], names, PostgresDatabase(db_url)
        finally:
            if args.keep_dir:
                harness.out.print(f"kept the database {database_name(db_url)}", highlight=False)
            else:
                asyncio.run(drop_database(pg_url, database_name(db_url)))


def database_name(url: str) -> str:
    return url.partition("?")[0].rpartition("/")[2]  # printed instead of the URL, which may hold a password


async def drop_database(pg_url: str, name: str) -> None:
    conn = await asyncpg.connect(pg_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def main(args: argparse.Namespace) -> int:
    iterations = QUICK_ITERATIONS if args.quick else args.iterations
    if error := usage_error(args, iterations):
        print(f"error: {error}", file=sys.stderr)
        return 2
    load = QUICK_LOAD if args.quick else FULL_LOAD
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    on_cluster = args.db == "postgres"
    where = (f"{args.replicas} replica(s) on PostgreSQL, lease {args.lease_s:g}s" if on_cluster
             else f"sqlite {args.sync}")
    harness.out.print(f"chaos: seed {seed}, {iterations} kills" + (f", {where}" if on_cluster else ""), highlight=False)
    with nats_server(args.keep_dir) as embedded:
        log_dir = Path(tempfile.mkdtemp(prefix="baton-chaos-"))
        log_path = log_dir / "handlers.jsonl"
        env = {"BATON_NATS_URL": embedded.url, "BATON_HANDLER_MODULES": json.dumps(HANDLER_MODULES),
               "CHAOS_HANDLER_LOG": str(log_path)}
        try:
            with contextlib.ExitStack() as stack:
                if on_cluster:
                    servers, names, db = stack.enter_context(cluster(args, env))
                else:
                    server = stack.enter_context(harness.start_server(
                        WORKFLOWS, sync=args.sync, keep_dir=args.keep_dir, extra_env=env))
                    servers, names, db = [server], ["server"], SqliteFile(server.workdir / "data" / "baton.db")
                # the worker stops first, then the servers
                stack.enter_context(worker(log_dir, embedded.url, {**os.environ, **env,
                                                                   "PYTHONPATH": servers[0].env["PYTHONPATH"]}))
                checks, figures = asyncio.run(chaos(servers, names, db, embedded.url, log_path, seed, iterations, load))
        finally:
            if args.keep_dir:
                harness.out.print(f"kept {log_dir} (handler log, worker log)", highlight=False)
            else:
                shutil.rmtree(log_dir, ignore_errors=True)
    report(checks, figures, f"chaos: {iterations} kills, seed {seed}, {where}")
    return 0 if all(c.ok for c in checks) else 1
