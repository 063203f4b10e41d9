"""Incident response (config/workflows/incident-response.yaml), end to end: an alert on
`alerts.fired` (JetStream) starts a run that enriches it, pages on-call in chat, waits
for an approver when the alert is critical (escalating to a second channel when nobody
answers within 15 minutes of the test clock), mitigates, verifies and reports; every
step is a span of the run's one trace, exported over OTLP and printed by `baton trace`."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.request
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import nats
import pytest

from tests.examples.support import ExampleServer, StandInServices
from tests.otlp import OtlpReceiver

T0 = 1_795_000_000.0  # the test clock's start (unix seconds); nothing moves it but the tests
APPROVAL_TIMEOUT_S = 15 * 60  # the workflow's approval timeout
WAIT_S = 45.0  # bound of each wait: generous for a loaded 2-core machine


@pytest.fixture
def standins() -> Iterator[StandInServices]:
    with StandInServices("incidents") as services:
        yield services


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture
def baton(tmp_path, nats_server, standins, receiver) -> Iterator[ExampleServer]:
    api = standins.base("incidents")
    server = ExampleServer(tmp_path / "baton", nats_server.url, clock_start=T0, INCIDENT_API_URL=api,
                           # approval links go to the on-call channel, as a team would set approvals.notify_url
                           BATON_APPROVALS__NOTIFY_URL=f"{api}/chat/oncall",
                           OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_BSP_SCHEDULE_DELAY="50")
    server.env["BATON_PUBLIC_URL"] = server.url  # links point at this server, as public_url makes them
    server.start(timeout_s=WAIT_S)
    try:
        yield server
    finally:
        server.stop()


def alert(fingerprint: str, service: str, severity: str, name: str = "HighErrorRate") -> dict[str, Any]:
    """One alert as Alertmanager describes it."""
    return {"fingerprint": fingerprint, "status": "firing", "startsAt": "2026-11-18T09:12:00Z",
            "labels": {"alertname": name, "service": service, "severity": severity, "env": "prod"},
            "annotations": {"summary": "5xx ratio above 5% for 5m"}}


def publish(nats_url: str, body: dict[str, Any], msg_id: str) -> None:
    async def send() -> None:
        nc = await nats.connect(nats_url)
        try:
            ack = await nc.jetstream().publish("alerts.fired", json.dumps(body).encode(), headers={"Nats-Msg-Id": msg_id})
            assert ack.stream == "BATON_EVENTS"
        finally:
            await nc.close()
    asyncio.run(send())


def run_of(baton: ExampleServer, fingerprint: str) -> str:
    def started() -> str | None:
        runs = [r for r in baton.runs("incident-response") if r["workflow_id"] == fingerprint]
        assert len(runs) <= 1, runs
        return runs[0]["run_id"] if runs else None
    return baton.wait_for(started, f"a run for alert {fingerprint}", WAIT_S)


def pending_approval(baton: ExampleServer, run_id: str, step: str) -> dict[str, Any]:
    def pending() -> dict[str, Any] | None:
        found = baton.ok("GET", f"/v1/approvals?status=pending&run_id={run_id}")["approvals"]
        return next((a for a in found if a["step_id"] == step), None)
    return baton.wait_for(pending, f"the approval {step} of run {run_id}", WAIT_S)


def message(baton: ExampleServer, standins: StandInServices, channel: str, pattern: str) -> re.Match[str]:
    state = standins.states["incidents"]
    def posted() -> re.Match[str] | None:
        return next((m for t in state.texts(channel) if (m := re.search(pattern, t, re.S))), None)
    return baton.wait_for(posted, f"a message matching {pattern!r} on #{channel}", WAIT_S)


def post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", "Accept": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


def statuses(baton: ExampleServer, run_id: str) -> dict[str, str]:
    return {key: step["status"] for key, step in baton.steps(run_id).items()}


def check_one_trace(baton: ExampleServer, receiver: OtlpReceiver, run_id: str, steps: set[str]) -> dict[str, Any]:
    """Every step of the run has a span, all in the run's one trace, under its run span;
    `baton trace` prints the same tree. Returns the spans by name."""
    trace_id = baton.run(run_id)["trace_id"]
    wanted = {"run incident-response", *steps}
    spans = receiver.wait_for(lambda got: wanted <= {s["name"] for s in got if s["attributes"].get("baton.run.id") == run_id},
                              f"the spans {sorted(wanted)} of run {run_id}", WAIT_S)
    mine = [s for s in spans if s["attributes"].get("baton.run.id") == run_id]
    assert {s["trace_id"] for s in mine} == {trace_id}
    by_name = {s["name"]: s for s in mine}
    root = by_name["run incident-response"]
    assert all(s["parent_id"] == root["span_id"] for s in mine if s is not root)
    assert root["status"] != "error"
    printed = baton.cli("trace", run_id).stdout
    assert trace_id in printed
    for name in wanted:
        assert name in printed, f"{name!r} missing from `baton trace`:\n{printed}"
    return by_name


def parent_of(traceparent: str | None) -> tuple[str, str]:
    """(trace id, parent span id) of a W3C traceparent header."""
    assert traceparent is not None
    _, trace_id, span_id, _ = traceparent.split("-")
    return trace_id, span_id


def test_critical_alert_waits_for_approval_then_rolls_back(baton, standins, receiver, nats_server):
    state = standins.states["incidents"]
    cloudevent = {"specversion": "1.0", "id": "am-1", "source": "alertmanager", "type": "alerts.fired",
                  "datacontenttype": "application/json", "data": alert("fp-checkout-1", "checkout", "critical")}
    publish(nats_server.url, cloudevent, "am-1")
    run_id = run_of(baton, "fp-checkout-1")

    # enriched and paged: owner, runbook, the fresh deploy as the proposed rollback
    page = message(baton, standins, "oncall", r"^\[CRITICAL\] HighErrorRate on checkout")
    assert "Owner: payments" in page.string and "rollback to 2.4.0" in page.string
    assert "Waiting 15 min for approval" in page.string
    # the approval link lands in the channel (approvals.notify_url); nothing is done before a decision
    link = message(baton, standins, "oncall", r"Approve or reject: (\S+)").group(1)
    assert link.startswith(f"{baton.url}/v1/approvals/")
    assert pending_approval(baton, run_id, "approve")["message"] == "Rollback checkout for HighErrorRate (critical)?"
    assert state.mitigations == []

    decided = post_json(link, {"decision": "approve", "name": "alice", "comment": "roll it back"})
    assert decided["approval"]["decided_by"] == "alice" and decided["approval"]["decided_via"] == "link"

    run = baton.wait_run(run_id, timeout_s=WAIT_S)
    assert run["status"] == "succeeded", run
    assert statuses(baton, run_id) == {"enrich": "succeeded", "page": "succeeded", "approve": "succeeded",
                                       "escalate": "skipped", "approve_escalated": "skipped",
                                       "mitigate": "succeeded", "verify": "succeeded", "resolve": "succeeded"}
    assert [(m["service"], m["action"], m["version"]) for m in state.mitigations] == [("checkout", "rollback", "2.4.0")]
    assert state.texts("oncall")[-1].startswith("Mitigated: HighErrorRate on checkout: rollback done")
    assert state.texts("escalation") == []

    spans = check_one_trace(baton, receiver, run_id, {"step enrich", "step page", "approval approve",
                                                      "step mitigate", "step verify", "step resolve"})
    # the handlers' calls carry the step's span as their parent: the services can join the trace
    for path, span in (("/enrich", "step enrich"), ("/mitigations", "step mitigate"),
                       ("/services/checkout/health", "step verify")):
        assert [parent_of(tp) for tp in state.traceparents(path)] == [(run["trace_id"], spans[span]["span_id"])]


def test_nobody_answers_so_it_escalates_and_the_second_approver_decides(baton, standins, receiver, nats_server):
    state = standins.states["incidents"]
    # a plain JSON alert (no CloudEvent envelope) works the same
    publish(nats_server.url, alert("fp-checkout-2", "checkout", "high", name="LatencyHigh"), "am-2")
    run_id = run_of(baton, "fp-checkout-2")
    first = pending_approval(baton, run_id, "approve")
    assert state.texts("escalation") == []

    # nobody answers: 15 minutes pass on the test clock. The request (and its timeout, a
    # durable timer committed with it) is stored; the server's timer loop sleeps only up
    # to its next refill of the near timers, which reads the timeout once the clock is past it.
    deadline = T0 + APPROVAL_TIMEOUT_S
    assert datetime.fromisoformat(first["expires_at"]).timestamp() == deadline
    baton.set_clock(deadline + 1)

    escalation = message(baton, standins, "escalation", r"^No answer from on-call within 15 min: \[HIGH\] LatencyHigh")
    assert f"baton approve {run_id} --step approve_escalated" in escalation.string
    assert state.mitigations == []
    second = pending_approval(baton, run_id, "approve_escalated")
    assert second["approvers"] == ["incident-commander"]
    timed_out = baton.steps(run_id)["approve"]["output"]
    assert (timed_out["decision"], timed_out["by"]) == ("reject", "timeout")

    baton.ok("POST", f"/v1/runs/{run_id}/approval",
             {"decision": "approve", "step": "approve_escalated", "comment": "IC: go"})
    run = baton.wait_run(run_id, timeout_s=WAIT_S)
    assert run["status"] == "succeeded", run
    assert statuses(baton, run_id) == {"enrich": "succeeded", "page": "succeeded", "approve": "succeeded",
                                       "escalate": "succeeded", "approve_escalated": "succeeded",
                                       "mitigate": "succeeded", "verify": "succeeded", "resolve": "succeeded"}
    assert [(m["service"], m["action"]) for m in state.mitigations] == [("checkout", "rollback")]
    assert state.texts("oncall")[-1].startswith("Mitigated: LatencyHigh on checkout")

    check_one_trace(baton, receiver, run_id, {"step enrich", "step page", "approval approve", "step escalate",
                                              "approval approve_escalated", "step mitigate", "step verify",
                                              "step resolve"})


def test_warning_is_mitigated_at_once_without_approval(baton, standins, receiver, nats_server):
    state = standins.states["incidents"]
    # as a user publishes one by hand: `baton publish`
    baton.cli("publish", "alerts.fired", json.dumps(alert("fp-search-1", "search", "warning", name="PodCrashLooping")),
              "--id", "am-3", "--source", "alertmanager", "--nats-url", nats_server.url)
    run_id = run_of(baton, "fp-search-1")
    run = baton.wait_run(run_id, timeout_s=WAIT_S)
    assert run["status"] == "succeeded", run
    assert statuses(baton, run_id) == {"enrich": "succeeded", "page": "succeeded", "approve": "skipped",
                                       "escalate": "skipped", "approve_escalated": "skipped",
                                       "mitigate": "succeeded", "verify": "succeeded", "resolve": "succeeded"}
    # no deploy of `search` lately: restart, not rollback
    assert [(m["service"], m["action"], m["version"]) for m in state.mitigations] == [("search", "restart", None)]
    assert baton.ok("GET", f"/v1/approvals?status=all&run_id={run_id}")["approvals"] == []
    oncall = state.texts("oncall")
    assert len(oncall) == 2, oncall
    assert oncall[0].startswith("[WARNING] PodCrashLooping on search") and "Applying it now." in oncall[0]
    assert oncall[1].startswith("Mitigated: PodCrashLooping on search: restart done")
    check_one_trace(baton, receiver, run_id, {"step enrich", "step page", "step mitigate", "step verify",
                                              "step resolve"})


def test_a_fix_that_does_not_help_hands_over_to_on_call(baton, standins, receiver, nats_server):
    state = standins.states["incidents"]
    state.stays_unhealthy.add("search")
    publish(nats_server.url, alert("fp-search-2", "search", "warning", name="PodCrashLooping"), "am-4")
    run_id = run_of(baton, "fp-search-2")

    # verify polls the health check: 6 attempts, 10 s apart and doubling (at most 2 min), on the
    # test clock. Once attempt n is `retrying`, its retry timer is stored; moving the clock to
    # it fires it (the timer loop wakes, and reads near timers from the store if need be).
    at = T0
    for attempt, delay_s in enumerate((10, 20, 40, 80, 120), start=1):
        baton.wait_for(lambda: (v := baton.steps(run_id).get("verify")) and (v["attempt"], v["status"]) == (attempt, "retrying"),
                       f"verify's attempt {attempt} to fail", WAIT_S)
        at += delay_s
        baton.set_clock(at)
    run = baton.wait_run(run_id, timeout_s=WAIT_S)
    assert run["status"] == "compensated", run
    assert run["error"]["step"] == "verify" and run["error"]["type"] == "StillUnhealthy"
    steps = baton.steps(run_id)
    assert steps["verify"]["attempt"] == 6
    assert {key: step["status"] for key, step in steps.items()} == {
        "enrich": "succeeded", "page": "succeeded", "approve": "skipped", "escalate": "skipped",
        "approve_escalated": "skipped", "mitigate": "succeeded", "verify": "failed"}  # resolve never started
    assert steps["page"]["compensation"]["status"] == "succeeded"
    # the page's compensation tells on-call it is theirs now; nothing claims a fix
    oncall = state.texts("oncall")
    assert oncall[-1] == f"Automated response to PodCrashLooping on search stopped without a fix (run {run_id}): over to you."
    assert not any(t.startswith("Mitigated") for t in oncall)

    spans = receiver.wait_for(lambda got: sum(s["name"] == "step verify" and s["attributes"].get("baton.run.id") == run_id
                                              for s in got) == 6 and any(s["name"] == "compensate page" for s in got),
                              "six verify attempts and the page's compensation", WAIT_S)
    mine = [s for s in spans if s["attributes"].get("baton.run.id") == run_id]
    assert {s["trace_id"] for s in mine} == {run["trace_id"]}
    assert [s["status"] for s in mine if s["name"] == "step verify"] == ["error"] * 6


def test_a_rejection_is_an_answer_nothing_is_done_and_on_call_is_told(baton, standins, receiver, nats_server):
    state = standins.states["incidents"]
    publish(nats_server.url, alert("fp-search-3", "search", "critical", name="DiskFull"), "am-5")
    run_id = run_of(baton, "fp-search-3")
    pending_approval(baton, run_id, "approve")
    baton.cli("approve", run_id, "--reject", "--comment", "a restart loses the reindex")
    run = baton.wait_run(run_id, timeout_s=WAIT_S)
    assert run["status"] == "succeeded", run  # the playbook ran to its end: the answer was no
    assert statuses(baton, run_id) == {"enrich": "succeeded", "page": "succeeded", "approve": "succeeded",
                                       "escalate": "skipped", "approve_escalated": "skipped",
                                       "mitigate": "skipped", "verify": "skipped", "resolve": "succeeded"}
    assert state.mitigations == [] and state.texts("escalation") == []
    assert state.texts("oncall")[-1] == f"Not mitigated: DiskFull on search: the restart was rejected by anonymous. (run {run_id})"
