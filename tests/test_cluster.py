"""Several replicas on one PostgreSQL database and one NATS server (server/cluster.py):
real server processes on loopback, killed with SIGKILL, checked from the database.

The checks are the crash loop's (bench/chaos.py), on a cluster: every run ends as it
should; each succeeded step has one recorded result; invocations of a step are at most
its recorded attempts plus the kills that hit it, and none is of an attempt never
recorded; each schedule tick starts one run, whichever replicas were alive."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import nats
import orjson
import pytest

from tests.serverproc import ServerProcess

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

LEASE_S = 2.0  # short, so a test sees failover in seconds
DEFAULT_LEASE_S = 10.0

CHAIN = """\
name: chain
steps:
  - {id: a, task: cluster.step, input: {path: "{{ input.path }}", work_ms: "{{ input.work_ms }}"}}
  - {id: b, task: cluster.step, input: {path: "{{ input.path }}", work_ms: "{{ input.work_ms }}"}}
  - {id: c, task: cluster.step, input: {path: "{{ input.path }}", work_ms: "{{ input.work_ms }}"}}
"""
NAP = """\
name: nap
steps:
  - {id: a, task: cluster.step, input: {path: "{{ input.path }}"}}
  - {id: rest, sleep: 1s}
  - {id: b, task: cluster.step, input: {path: "{{ input.path }}"}}
"""
TICK = """\
name: tick
triggers:
  - cron: {name: every-second, schedule: "* * * * * *", input: {path: "%s"}}
steps:
  - {id: a, task: cluster.step, input: {path: "{{ input.path }}"}}
"""
EVENTED = """\
name: evented
triggers:
  - event: {subject: "clu.orders.>", input: {path: "{{ event.data.path }}", eid: "{{ event.data.eid }}"}}
steps:
  - {id: a, task: cluster.step, input: {path: "{{ input.path }}"}}
  - {id: b, task: cluster.step, input: {path: "{{ input.path }}"}}
"""
GATED = """\
name: gated
steps:
  - {id: a, task: cluster.step, input: {path: "{{ input.path }}"}}
  - {id: ok, wait_for_signal: {approval: {message: "ship {{ input.n }}?"}}}
  - {id: go, wait_for_signal: {signal: go, timeout: 1h}}
  - {id: b, task: cluster.step, input: {path: "{{ input.path }}"}}
"""
LIMITED = """\
name: limited
concurrency: {limit: 2, key: "{{ input.team }}"}
steps:
  - {id: a, task: cluster.hold, input: {path: "{{ input.path }}", hold_ms: 300}}
"""


class Replica(ServerProcess):
    def __init__(self, root: Path, name: str, db: str, nats_url: str, workflows: Path, lease_s: float) -> None:
        super().__init__(root / name, workflows, ["tests.cluster_handlers"], BATON_DB=db, BATON_NATS_URL=nats_url,
                         BATON_CLUSTER__REPLICA=name, BATON_CLUSTER__LEASE_S=str(lease_s), BATON_LOG_LEVEL="INFO")
        self.name = name


@contextlib.contextmanager
def start_replicas(tmp_path: Path, postgres_url: str, nats_url: str, names: list[str],
                   files: dict[str, str], lease_s: float = LEASE_S) -> Iterator[list[Replica]]:
    """The replicas, started in turn and all stopped at the end (a killed one too).

    `lease_s`: the tests without a kill take the default, for what a short one costs: an
    in-process step's heartbeat deadline is the lease, and on a loaded machine a result can
    take longer than 2 s to be decided; the attempt is then made again (at-least-once)."""
    workflows = tmp_path / "workflows"
    workflows.mkdir(exist_ok=True)
    for name, text in files.items():
        (workflows / f"{name}.yaml").write_text(text)
    replicas = [Replica(tmp_path, name, postgres_url, nats_url, workflows, lease_s) for name in names]
    try:
        for replica in replicas:
            replica.start(timeout_s=30)
        yield replicas
    finally:
        for replica in replicas:
            replica.stop()


def start_run(replica: Replica, workflow: str, input: dict, workflow_id: str) -> str:
    status, body = replica.request("POST", f"/v1/workflows/{workflow}/runs", {"input": input, "workflow_id": workflow_id})
    assert status in (200, 201), body
    return body["run_id"]


async def query(url: str, sql: str, *args) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def db(url: str, sql: str, *args) -> list[asyncpg.Record]:
    return asyncio.run(query(url, sql, *args))


def wait(predicate, what: str, timeout_s: float) -> object:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(0.1)


def replica_of(holder: str) -> str:
    """A lease holder is `<replica>/<process nonce>`."""
    return holder.partition("/")[0]


def invocations(path: Path) -> list[tuple[str, str, str, int]]:
    """(replica, run_id, step, attempt) of every handler call, in the order they began."""
    if not path.exists():
        return []
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [(r[0], r[1], r[2], int(r[3])) for r in rows]


def open_runs(url: str) -> int:
    return db(url, "SELECT count(*) AS n FROM runs WHERE status NOT IN ('succeeded', 'failed', 'compensated', 'cancelled')")[0]["n"]


def check_steps_once(url: str, calls: list[tuple[str, str, str, int]], killed: str | None) -> None:
    """Each succeeded step has one result; its invocations are its recorded attempts, plus
    at most one for an attempt the killed replica was running; no invocation of an attempt
    the store never recorded."""
    steps = db(url, "SELECT run_id, key, status, attempt FROM steps WHERE key NOT LIKE '%%#items'")
    recorded = {(s["run_id"], s["key"]): s for s in steps}
    assert all(s["status"] in ("succeeded", "skipped") for s in steps), [dict(s) for s in steps if s["status"] != "succeeded"]
    by_step: dict[tuple[str, str], list[tuple[str, int]]] = defaultdict(list)
    for replica, run_id, step, attempt in calls:
        by_step[(run_id, step)].append((replica, attempt))
    for key, made in by_step.items():
        assert key in recorded, f"an invocation of {key} that the store never recorded"
        step = recorded[key]
        assert all(attempt <= step["attempt"] for _, attempt in made), (key, made, step["attempt"])
        # at-least-once, bounded: one call per recorded attempt, plus one for the kill
        assert len(made) <= step["attempt"] + (killed is not None), (key, made, step["attempt"])
        # a later attempt exists only because the kill lost an earlier one (the handler never fails)
        assert step["attempt"] == 1 or killed is not None, (key, made)


@pytest.mark.timeout(180)
def test_replicas_share_the_runs_and_run_each_step_once(tmp_path, postgres_url, nats_server):
    ledger = tmp_path / "calls.log"
    with start_replicas(tmp_path, postgres_url, nats_server.url, ["r1", "r2"], {"chain": CHAIN},
                        lease_s=DEFAULT_LEASE_S) as replicas:
        runs = [start_run(replicas[i % 2], "chain", {"path": str(ledger), "work_ms": 20}, f"c-{i}") for i in range(40)]
        wait(lambda: open_runs(postgres_url) == 0 and len(db(postgres_url, "SELECT 1 FROM runs")) == 40,
             "every run to end", 90)
        statuses = Counter(r["status"] for r in db(postgres_url, "SELECT status FROM runs"))
        assert statuses == {"succeeded": 40}, statuses
        calls = invocations(ledger)
        assert len(calls) == 120, len(calls)
        check_steps_once(postgres_url, calls, killed=None)
        # both replicas' workers took steps of runs started on either
        share = Counter(replica for replica, *_ in calls)
        assert set(share) == {"r1", "r2"} and min(share.values()) >= 12, share
        # each replica answers for every run, wherever it was decided
        status, body = replicas[1].request("GET", f"/v1/runs/{runs[0]}")
        assert status == 200 and body["status"] == "succeeded", body


@pytest.mark.timeout(240)
def test_a_replica_killed_mid_load_loses_and_doubles_nothing(tmp_path, postgres_url, nats_server):
    ledger = tmp_path / "calls.log"
    with start_replicas(tmp_path, postgres_url, nats_server.url, ["r1", "r2", "r3"],
                        {"chain": CHAIN, "nap": NAP}) as replicas:
        leader = db(postgres_url, "SELECT holder, token FROM leases WHERE name = 'time'")[0]
        for i in range(45):
            start_run(replicas[i % 3], "chain", {"path": str(ledger), "work_ms": 150}, f"c-{i}")
        for i in range(9):
            start_run(replicas[i % 3], "nap", {"path": str(ledger)}, f"n-{i}")
        wait(lambda: len(invocations(ledger)) >= 40, "a third of the steps to start", 60)
        victim = next(r for r in replicas if r.name == replica_of(leader["holder"]))  # the time leader: timers must move
        victim.kill()
        survivors = [r for r in replicas if r is not victim]
        wait(lambda: open_runs(postgres_url) == 0, "every run to end after the kill", 120)
        statuses = Counter(r["status"] for r in db(postgres_url, "SELECT status FROM runs"))
        assert statuses == {"succeeded": 54}, statuses
        check_steps_once(postgres_url, invocations(ledger), killed=victim.name)
        # another replica took the time lease, with a new fencing token, and took the dead one's lease over
        now = db(postgres_url, "SELECT holder, token FROM leases WHERE name = 'time'")[0]
        assert replica_of(now["holder"]) in {r.name for r in survivors} and now["token"] > leader["token"], \
            (dict(leader), dict(now))
        wait(lambda: not db(postgres_url, "SELECT 1 FROM leases WHERE name = $1", f"replica:{victim.name}"),
             "the dead replica's lease to be taken over", 10 * LEASE_S)
        # nothing left to publish: every step's message and lifecycle event went out
        wait(lambda: not db(postgres_url, "SELECT 1 FROM outbox LIMIT 1"), "an empty outbox", 10 * LEASE_S)


@pytest.mark.timeout(180)
def test_every_schedule_tick_starts_one_run_across_replicas(tmp_path, postgres_url, nats_server):
    ledger = tmp_path / "calls.log"
    with start_replicas(tmp_path, postgres_url, nats_server.url, ["r1", "r2", "r3"],
                        {"tick": TICK % ledger}) as replicas:
        fires = "SELECT scheduled_at, outcome, run_id, missed FROM schedule_fires WHERE schedule = 'every-second'"
        wait(lambda: len(db(postgres_url, fires)) >= 4, "four ticks", 30)
        leader = replica_of(db(postgres_url, "SELECT holder FROM leases WHERE name = 'time'")[0]["holder"])
        before = len(db(postgres_url, fires))
        next(r for r in replicas if r.name == leader).kill()
        wait(lambda: len(db(postgres_url, fires)) >= before + 4, "four ticks after the leader died", 30)
        for replica in replicas:
            replica.stop()  # no fires after the rows are read
        rows = db(postgres_url, fires)
        ticks = Counter(row["scheduled_at"] for row in rows)
        assert all(n == 1 for n in ticks.values()), [t for t, n in ticks.items() if n > 1]
        started = [row for row in rows if row["outcome"] == "started"]
        runs = db(postgres_url, "SELECT run_id FROM runs WHERE workflow = 'tick'")
        assert sorted(r["run_id"] for r in started) == sorted(r["run_id"] for r in runs)
        # the ticks while the dead leader's lease ran out were fired late by the next one, not lost
        times = sorted(ticks)
        assert times == [times[0] + i for i in range(len(times))], times


async def publish_twice(nats_url: str, events: list[dict]) -> None:
    """Each event as a CloudEvent, published twice without Nats-Msg-Id: the stream keeps both
    copies, and replicas fetching at once may each get one. Only Baton's own dedupe (source + id,
    in the database) can keep them to one run."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        for data in events:
            body = orjson.dumps({"specversion": "1.0", "id": data["eid"], "source": "tests/cluster",
                                 "type": "order.created", "data": data})
            for _ in range(2):
                await js.publish("clu.orders.created", body)
    finally:
        await nc.close()


async def consumer_backlog(nats_url: str) -> int:
    """Messages of the trigger stream not yet delivered or not yet acknowledged, all replicas'."""
    nc = await nats.connect(nats_url)
    try:
        info = await nc.jetstream().consumer_info("BATON_EVENTS", "baton-triggers")
        return info.num_pending + info.num_ack_pending
    finally:
        await nc.close()


@pytest.mark.timeout(180)
def test_each_event_starts_one_run_across_replicas(tmp_path, postgres_url, nats_server):
    ledger = tmp_path / "calls.log"
    with start_replicas(tmp_path, postgres_url, nats_server.url, ["r1", "r2"], {"evented": EVENTED},
                        lease_s=DEFAULT_LEASE_S):
        asyncio.run(publish_twice(nats_server.url, [{"eid": f"e-{i}", "path": str(ledger)} for i in range(30)]))
        wait(lambda: asyncio.run(consumer_backlog(nats_server.url)) == 0, "every copy to be handled", 60)
        wait(lambda: open_runs(postgres_url) == 0, "every run to end", 60)
        runs = db(postgres_url, "SELECT run_id, status, data FROM runs")
        eids = Counter(orjson.loads(r["data"])["input"]["eid"] for r in runs)
        assert eids == {f"e-{i}": 1 for i in range(30)}, [e for e, n in eids.items() if n > 1]
        assert {r["status"] for r in runs} == {"succeeded"}
        assert db(postgres_url, "SELECT count(*) AS n FROM events")[0]["n"] == 30
        calls = invocations(ledger)
        assert len(calls) == 60, len(calls)
        check_steps_once(postgres_url, calls, killed=None)


async def signal_over_nats(nats_url: str, run_id: str) -> dict:
    nc = await nats.connect(nats_url)
    try:
        return orjson.loads((await nc.request(f"baton.signal.{run_id}.go", b"{}", timeout=10)).data)
    finally:
        await nc.close()


def waiting_for(replica: Replica, run_id: str) -> list[str]:
    status, body = replica.request("GET", f"/v1/runs/{run_id}")
    assert status == 200, body
    return body["waiting_for"]


@pytest.mark.timeout(180)
def test_approvals_and_signals_reach_a_run_on_any_replica(tmp_path, postgres_url, nats_server):
    """Runs started on r1 are approved on r2 by the links r1 signs (one signing key for both,
    kept in the database) and signalled over HTTP on r2 or over NATS (a queue group: any replica)."""
    ledger = tmp_path / "calls.log"
    with start_replicas(tmp_path, postgres_url, nats_server.url, ["r1", "r2"], {"gated": GATED},
                        lease_s=DEFAULT_LEASE_S) as replicas:
        r1, r2 = replicas
        runs = [start_run(r1, "gated", {"path": str(ledger), "n": i}, f"g-{i}") for i in range(6)]

        def pending() -> list[dict]:  # the links as r1 signs them
            status, body = r1.request("GET", "/v1/approvals?status=pending")
            assert status == 200, body
            return body["approvals"] if len(body["approvals"]) == 6 else []

        for approval in wait(pending, "six approval requests", 60):
            path = "/v1/approvals/" + approval["link"].rsplit("/", 1)[1]
            status, body = r2.request("POST", path, {"decision": "approve", "name": "carol"})
            assert status == 200, body
        for run_id in runs:
            wait(lambda: waiting_for(r1, run_id) == ["go"], f"{run_id} to wait for go", 30)
        for run_id in runs[:3]:
            status, body = r2.request("POST", f"/v1/runs/{run_id}/signals/go", {})
            assert status == 202, body
        for run_id in runs[3:]:
            reply = asyncio.run(signal_over_nats(nats_server.url, run_id))
            assert reply["ok"], reply
        wait(lambda: open_runs(postgres_url) == 0, "every run to end", 60)
        statuses = Counter(r["status"] for r in db(postgres_url, "SELECT status FROM runs"))
        assert statuses == {"succeeded": 6}, statuses
        decided = db(postgres_url, "SELECT status, decided_via FROM approvals")
        assert [(a["status"], a["decided_via"]) for a in decided] == [("approved", "link")] * 6
        calls = invocations(ledger)
        assert len(calls) == 12, len(calls)
        check_steps_once(postgres_url, calls, killed=None)


@pytest.mark.timeout(120)
def test_a_node_without_a_shared_nats_runs_alone_and_refuses_company(tmp_path, postgres_url, nats_server):
    """On PostgreSQL without nats_url (here: NATS off) Baton runs as one node, as on SQLite;
    a second such node, or a replica, would double its timers and schedules: refused at start."""
    ledger = tmp_path / "calls.log"
    workflows = tmp_path / "workflows"
    workflows.mkdir()
    (workflows / "chain.yaml").write_text(CHAIN)

    def alone(name: str) -> ServerProcess:
        return ServerProcess(tmp_path / name, workflows, ["tests.cluster_handlers"], BATON_DB=postgres_url,
                             BATON_NATS__ENABLED="false", BATON_CLUSTER__REPLICA=name, BATON_CLUSTER__LEASE_S=str(LEASE_S))

    a = alone("a")
    a.start(timeout_s=30)
    try:
        run_id = start_run(a, "chain", {"path": str(ledger), "work_ms": 0}, "solo")
        status, body = a.request("GET", f"/v1/runs/{run_id}/wait?timeout=20")
        assert status == 200 and body["status"] == "succeeded", body
        assert [(c[0], c[2]) for c in invocations(ledger)] == [("a", "a"), ("a", "b"), ("a", "c")]
        with pytest.raises(RuntimeError, match=r"another Baton without nats_url \(a/\w+\) runs on this database"):
            alone("b").start(timeout_s=30)
        with pytest.raises(RuntimeError, match=r"a Baton without a shared NATS \(a/\w+\) runs alone"):
            Replica(tmp_path, "r1", postgres_url, nats_server.url, workflows, LEASE_S).start(timeout_s=30)
    finally:
        a.stop()
    # stopped, it gave its lease up: replicas may start, and then a lone node may not
    r1 = Replica(tmp_path, "r1", postgres_url, nats_server.url, workflows, LEASE_S)
    r1.start(timeout_s=30)
    try:
        with pytest.raises(RuntimeError, match=r"replicas run on this database \(r1\)"):
            alone("c").start(timeout_s=30)
    finally:
        r1.stop()


def most_at_once(lines: list[str]) -> int:
    """The most holds running at one moment."""
    edges = []
    for line in lines:
        kind, _, _, at = line.split()
        edges.append((float(at), 0 if kind == "end" else 1))  # at one instant, an end frees before a begin
    now = peak = 0
    for _, begins in sorted(edges):
        now += 1 if begins else -1
        peak = max(peak, now)
    return peak


@pytest.mark.timeout(180)
def test_a_concurrency_limit_holds_across_replicas(tmp_path, postgres_url, nats_server):
    """Runs of one key started on both replicas: at most `limit` at once in the cluster, not
    per replica (the time leader counts the slots); every run still starts and ends."""
    ledger = tmp_path / "holds.log"
    with start_replicas(tmp_path, postgres_url, nats_server.url, ["r1", "r2"], {"limited": LIMITED},
                        lease_s=DEFAULT_LEASE_S) as replicas:
        for i in range(12):
            start_run(replicas[i % 2], "limited", {"path": str(ledger), "team": "red"}, f"l-{i}")
        start_run(replicas[1], "limited", {"path": str(ledger), "team": "blue"}, "other-key")  # its own slots
        wait(lambda: open_runs(postgres_url) == 0 and len(db(postgres_url, "SELECT 1 FROM runs")) == 13,
             "every run to end", 90)
        statuses = Counter(r["status"] for r in db(postgres_url, "SELECT status FROM runs"))
        assert statuses == {"succeeded": 13}, statuses
        lines = ledger.read_text().splitlines()
        other = {r["run_id"] for r in db(postgres_url, "SELECT run_id FROM runs WHERE workflow_id = 'other-key'")}
        peak = most_at_once([line for line in lines if line.split()[2] not in other])
        assert peak <= 2, f"{peak} runs of one key at once, over the limit of 2"
        assert len(lines) == 26  # each run's step began and ended once
