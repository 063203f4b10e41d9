"""Several Baton replicas on one PostgreSQL database and one NATS cluster.

Nothing here is a cluster of Baton's own: PostgreSQL holds the state and decides who
wins, JetStream carries the work. What each part does, and why it is safe:

* **Decisions.** Any replica may decide any run. Every run row carries a revision; a
  commit writes a run only if the row still has the revision its decision was read at
  (the store's fence, `Stale` otherwise), and the loser decides the event again from
  the stored state. Effects follow the commit ("decide, commit, act"), so of two
  replicas deciding one run at once, only the winner's effects happen.
* **Steps.** In-process steps go through the JetStream work queue `cluster.queue`
  (every replica runs a worker on it) and remote steps through theirs. The message of
  an attempt is an outbox row committed with the decision that made it, so a replica
  killed right after its commit loses nothing: any replica's outbox publisher sends it.
  A worker that dies with an attempt stops heartbeating, and the heartbeat deadline
  (`lease_s` for in-process steps) retries it elsewhere.
* **Events, results, signals.** Shared durable consumers (a queue group for signals):
  each message goes to one replica; one whose replica died is delivered again after its
  ack wait. An event's run id derives from its key, so a second start of it is `Stale`
  on insert and finds the first.
* **Time.** One replica holds the lease `time` (a row in the database, on the
  database's clock, with a fencing token): it fires the durable timers and the
  schedules, and recovers what is in flight. Schedule commits carry the token, so a
  leader that lost the lease (paused, partitioned) cannot commit a fire. Timers armed on
  other replicas reach it over core NATS (`baton.cluster.timers`); its refill reads the
  store every `lease_s` besides, for the notices lost while it changed hands.
* **Concurrency limits.** The time leader alone counts a workflow's `concurrency` slots
  and admits the runs queued for one: every other replica stores a limited run queued
  and tells the leader (`baton.cluster.slots`, as it tells when a run gives its slot
  up); the leader counts again from the store every round, for lost notices.
* **Failover.** Each replica renews its own lease `replica:<name>` every lease_s / 3.
  When one expires, the leader takes it over: it starts the child runs that the dead
  replica committed and never started (its steps need nothing: see above). When the
  leader dies, the time lease expires and another replica takes it within `lease_s`.

Without a NATS they all connect to (`nats_url`), there is nothing to share the work
through, and Baton on PostgreSQL runs as one node, as on SQLite (`SoleNode`): it holds
the lease `node`, so that a second Baton started on the same database, alone or as a
replica, is refused at start instead of firing every timer and schedule a second time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from typing import Any

import orjson

from server.bus.connection import Bus
from server.bus.remote import task_message
from server.bus.tasks import cancel_subject
from server.engine.commands import ExecuteTask
from server.engine.state import RunState
from server.errors import BatonError, ConfigError
from server.runtime.executor import RunInfo
from server.runtime.persist import task_key
from server.settings import Cluster as ClusterSettings
from server.store.base import OutboxRow, Store

log = logging.getLogger("baton.cluster")

TIME_LEASE = "time"
REPLICA_LEASE = "replica:"
SOLE_LEASE = "node"  # held by a Baton on PostgreSQL without nats_url: it runs alone
TIMERS_SUBJECT = "baton.cluster.timers"
SLOTS_SUBJECT = "baton.cluster.slots"  # runs queued for a concurrency slot, and slots given up
RENEWALS_PER_LEASE = 3  # a lease is renewed this often per lease_s: two renewals may fail before it lapses
POLL_S = 0.25  # how often a replica waiting on a run looks in the store for an end another replica decided


def replica_name(settings: ClusterSettings) -> str:
    return settings.replica or f"{socket.gethostname()}:{os.getpid()}"


class Cluster:
    """This replica's part: the leases it holds, and the hooks the runtime calls."""

    def __init__(self, settings: ClusterSettings, store: Store, bus: Bus, runtime: Any) -> None:
        self.replica = replica_name(settings)
        # the leases' holder: unique to this process, so a replica restarted under its name
        # takes nothing over from its previous life unseen (a new time token, a lapse noticed)
        self.holder = holder_of(self.replica)
        self.queue = settings.queue
        self.lease_s = settings.lease_s
        self.poll_s = POLL_S
        self.store, self.bus, self.runtime = store, bus, runtime
        self.scheduler: Any = None  # the wiring sets it once built: the time leader runs it
        self.token: int | None = None  # the time lease's fencing token while this replica leads
        self._task: asyncio.Task | None = None
        self._subs: list[Any] = []
        self._chores: set[asyncio.Task] = set()

    @property
    def leader(self) -> bool:
        return self.token is not None

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Take this replica's lease, listen for timers, and contend for the time lease."""
        await self._join()
        for subject, cb in ((TIMERS_SUBJECT, self._on_timer), (SLOTS_SUBJECT, self._on_slot)):
            self._subs.append(self.bus.track(await self.bus.nc.subscribe(subject, cb=cb)))
        if self.scheduler is not None:
            await self.scheduler.load()
        await self._round()
        self._task = asyncio.create_task(self._loop(), name="baton-cluster")
        log.info("replica %s joined (%s the time leader)", self.replica, "is" if self.leader else "is not")

    async def _join(self) -> None:
        """Take the lease `replica:<name>`. Held by another process: a replica of that name
        runs, or ran until moments ago (then its lease lapses within lease_s, and whoever
        takes it over starts what it left behind)."""
        if sole := await _live_holder(self.store, SOLE_LEASE):
            raise ConfigError(f"a Baton without a shared NATS ({sole}) runs alone on this database: stop it, "
                              "or set its nats_url so that it joins the replicas")
        name = REPLICA_LEASE + self.replica
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 2 * self.lease_s
        while (token := await self.store.acquire_lease(name, self.holder, self.lease_s)) is None:
            if loop.time() > deadline:
                raise BatonError(f"another live replica is named {self.replica!r}: give each its own cluster.replica")
            await asyncio.sleep(self.lease_s / RENEWALS_PER_LEASE)
        if token > 1:  # a previous process's lease, lapsed and not yet taken over: do it here
            checked = await self.runtime.sweep()
            log.warning("replica %s took over its previous process's lease: %d open runs checked", self.replica, checked)

    async def stop(self) -> None:
        """Hand the time lease over at once (no lapse to wait for), then the replica's own."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.leader:
            await self._step_down()
            await self._release(TIME_LEASE)
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:  # the connection is gone: nothing to release
                pass
        self._subs = []
        await self._drop(REPLICA_LEASE + self.replica)

    async def _release(self, name: str) -> None:
        try:
            await self.store.release_lease(name, self.holder)
        except BatonError as exc:
            log.warning("cannot release lease %s (it lapses by itself): %s", name, exc.message)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / RENEWALS_PER_LEASE)
            try:
                await self._round()
            except Exception:  # the store is failing: the leases lapse, and others take over
                log.exception("cluster round failed; trying again")

    async def _round(self) -> None:
        if await self.store.acquire_lease(REPLICA_LEASE + self.replica, self.holder, self.lease_s) is None:
            log.error("replica %s: its lease lapsed and another process took it over", self.replica)
        token = await self.store.acquire_lease(TIME_LEASE, self.holder, self.lease_s)
        if token is None and self.leader:
            log.warning("replica %s lost the time lease: another replica fires timers and schedules now", self.replica)
            await self._step_down()
        elif token is not None and token != self.token:
            await self._step_down()  # a new term (this replica's lease lapsed and came back): start afresh
            await self._step_up(token)
        if self.leader:
            await self._take_over_lapsed()
            await self.runtime.reconcile_slots()
        elif self.scheduler is not None:
            await self.scheduler.load()  # for the views this replica serves

    async def _step_up(self, token: int) -> None:
        self.token = token
        recovered = await self.runtime.lead()
        if self.scheduler is not None:
            self.scheduler.fence = (TIME_LEASE, self.holder, token)
            self.scheduler.refresh_s = self.lease_s / RENEWALS_PER_LEASE
            await self.scheduler.start()
        log.info("replica %s leads time (token %d): %d runs recovered", self.replica, token, recovered)

    async def _step_down(self) -> None:
        if self.token is None:
            return
        self.token = None
        if self.scheduler is not None:
            await self.scheduler.stop()
        await self.runtime.follow()

    async def _take_over_lapsed(self) -> None:
        for name, holder, _, expires_at, now in await self.store.list_leases(REPLICA_LEASE):
            if expires_at >= now or holder == self.holder:
                continue
            # take the lapsed lease (one winner), do the work, then remove it: a leader that
            # dies in between leaves it to lapse again, and the next one does it (idempotent)
            if await self.store.acquire_lease(name, self.holder, self.lease_s) is None:
                continue
            checked = await self.runtime.sweep()
            await self._drop(name)
            log.warning("replica %s stopped renewing its lease: %d open runs checked for children to start",
                        name.removeprefix(REPLICA_LEASE), checked)

    async def _drop(self, name: str) -> None:
        try:
            await self.store.drop_lease(name, self.holder)
        except BatonError as exc:
            log.warning("cannot remove lease %s (it lapses by itself): %s", name, exc.message)

    # ------------------------------------------------------- runtime hooks

    def task_row(self, cmd: ExecuteTask, run: RunInfo) -> OutboxRow:
        """The message of an attempt, as an outbox row to commit with its decision."""
        subject, body, headers = task_message(cmd, run, self.runtime.clock.now())
        return OutboxRow(None, subject, cmd.task_id, orjson.dumps(headers), body)

    def cancel(self, state: RunState, task_id: str) -> None:
        """Tell the workers of the attempt's queue to stop it (core NATS, best effort: the
        engine ignores whatever a cancelled attempt still reports)."""
        node = state.graph.nodes.get(task_key(state.run_id, task_id).rpartition("/")[2])
        if node is not None and node.queue is not None:
            self._publish(cancel_subject(node.queue), {"task_id": task_id})

    def arm(self, run_id: str, timer_id: str, fire_at: float) -> None:
        if self.leader:
            self.runtime.timers.arm(run_id, timer_id, fire_at)
        else:
            self._publish(TIMERS_SUBJECT, {"arm": [run_id, timer_id, fire_at]})

    def disarm(self, run_id: str, timer_id: str) -> None:
        if self.leader:
            self.runtime.timers.disarm(run_id, timer_id)
        else:
            self._publish(TIMERS_SUBJECT, {"disarm": [run_id, timer_id]})

    async def _on_timer(self, msg: Any) -> None:
        if not self.leader:
            return
        try:
            body = orjson.loads(msg.data)
            if "arm" in body:
                run_id, timer_id, fire_at = body["arm"]
                self.runtime.timers.arm(str(run_id), str(timer_id), float(fire_at))
            else:
                run_id, timer_id = body["disarm"]
                self.runtime.timers.disarm(str(run_id), str(timer_id))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("ignoring a malformed message on %s", TIMERS_SUBJECT)

    def slot_notice(self, kind: str, key: tuple[str, str], run_id: str) -> None:
        """Tell the time leader, who counts the concurrency slots, that a run was stored queued
        or gave its slot up (best effort: its count from the store every round catches up)."""
        self._publish(SLOTS_SUBJECT, {kind: [key[0], key[1], run_id]})

    async def _on_slot(self, msg: Any) -> None:
        if not self.leader:
            return
        try:
            body = orjson.loads(msg.data)
            kind = "queued" if "queued" in body else "released"
            workflow, slot, run_id = (str(v) for v in body[kind])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("ignoring a malformed message on %s", SLOTS_SUBJECT)
            return
        if kind == "queued":
            self.runtime.slot_queued((workflow, slot), run_id)
        else:
            self.runtime.slot_released((workflow, slot), run_id)

    def _publish(self, subject: str, body: dict[str, Any]) -> None:
        async def send() -> None:
            try:
                await self.bus.nc.publish(subject, orjson.dumps(body))
            except Exception as exc:  # best effort: the leader's refill finds timers anyway
                log.info("cannot publish on %s: %s", subject, exc)

        task = asyncio.create_task(send())
        self._chores.add(task)
        task.add_done_callback(self._chores.discard)


def holder_of(name: str) -> str:
    """A lease holder: the node's name and a nonce of this process."""
    return f"{name}/{uuid.uuid4().hex[:8]}"


async def _live_holder(store: Store, name: str) -> str | None:
    """Who holds the lease `name`, if it has not expired."""
    return next((holder for n, holder, _, expires_at, now in await store.list_leases(name)
                 if n == name and expires_at >= now), None)


class SoleNode:
    """Baton on PostgreSQL without a shared NATS (nats_url): one node, as on SQLite (nothing
    to share the work through). It holds the lease `node` while it runs, renewed every lease_s / 3."""

    def __init__(self, settings: ClusterSettings, store: Store) -> None:
        self.name = replica_name(settings)
        self.holder = holder_of(self.name)
        self.lease_s = settings.lease_s
        self.store = store
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Refuse to start beside replicas or another node; else take the lease (one that
        lapsed, left by a node that died, is taken over)."""
        replicas = [n.removeprefix(REPLICA_LEASE) for n, _, _, expires_at, now in await self.store.list_leases(REPLICA_LEASE)
                    if expires_at >= now]
        if replicas:
            raise ConfigError(f"replicas run on this database ({', '.join(replicas)}): a Baton without nats_url "
                              "cannot join them; set it to theirs")
        if await self.store.acquire_lease(SOLE_LEASE, self.holder, self.lease_s) is None:
            holder = await self.store.get_lease(SOLE_LEASE)
            raise ConfigError(f"another Baton without nats_url ({holder[0] if holder else '?'}) runs on this "
                              "database: one may run alone, or several as replicas with nats_url set")
        self._task = asyncio.create_task(self._renew(), name="baton-sole-node")
        log.info("%s runs alone on this database (no nats_url: no replicas to share the work with)", self.name)

    async def _renew(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / RENEWALS_PER_LEASE)
            try:
                if await self.store.acquire_lease(SOLE_LEASE, self.holder, self.lease_s) is None:
                    log.error("%s: its lease `node` lapsed and another Baton took it: two nodes may now fire "
                              "the same timers and schedules; stop one", self.name)
            except BatonError as exc:
                log.warning("cannot renew the lease `node`: %s", exc.message)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            await self.store.release_lease(SOLE_LEASE, self.holder)
        except BatonError as exc:
            log.warning("cannot release the lease `node` (it lapses by itself): %s", exc.message)
