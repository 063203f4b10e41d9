"""Nightly dev shutdown (config/workflows/nightly-dev-shutdown.yaml) against moto's EC2
and S3 in server mode, with the server's clock moved from fire to fire.

The week: Thursday 26 November 2026 (Thanksgiving) to Tuesday 1 December. The
month-end close covers New York's last two business days of November, Friday 27th
and Monday 30th, so the stops of those evenings are skipped in both zones (Berlin's
19:00 is 13:00 in New York) and the mornings' starts find everything running.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo

import boto3
import pytest

from handlers.context import Context, NonRetryableError
from handlers.examples import finops
from tests.examples.support import ExampleServer

WORKFLOW = "nightly-dev-shutdown"
NEW_YORK = ZoneInfo("America/New_York")
BUCKET = "finops-reports-test"
# The scheduler sleeps until the next fire, but at most an hour (server/triggers/scheduler.py
# IDLE_S); moving the clock straight to the fire from there is still on time.
SCHEDULER_IDLE_S = 3600.0
MINE = ("stop-dev-payments", "start-dev-payments", "stop-dev-search", "start-dev-search")
# Thanksgiving, 12:00 in New York, 18:00 in Berlin: before the evening's stops
CLOCK_START = datetime(2026, 11, 26, 17, tzinfo=timezone.utc).timestamp()
# after the last fire this test looks at: Monday 30th, 19:00 in New York
CLOCK_END = datetime(2026, 12, 1, 0, tzinfo=timezone.utc).timestamp()


def at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def utc(day: int, hour: int, month: int = 11) -> float:
    return datetime(2026, month, day, hour, tzinfo=timezone.utc).timestamp()


# What each fire of the week does, by UTC time (New York is UTC-5, Berlin UTC+1).
# "skip": the month-end close; a set: the instances the run stops or starts.
EXPECTED = {
    (utc(26, 18), "stop-dev-search"): {"search"},          # Thu 19:00 Berlin
    (utc(27, 0), "stop-dev-payments"): {"payments"},       # Thu 19:00 New York (Thanksgiving is no close day)
    (utc(27, 6), "start-dev-search"): {"search"},          # Fri 07:00 Berlin
    (utc(27, 12), "start-dev-payments"): {"payments"},     # Fri 07:00 New York
    (utc(27, 18), "stop-dev-search"): "skip",              # Fri 27th: close
    (utc(28, 0), "stop-dev-payments"): "skip",             # Fri 27th 19:00 New York: close
    (utc(30, 6), "start-dev-search"): set(),               # already running: nothing to start
    (utc(30, 12), "start-dev-payments"): set(),
    (utc(30, 18), "stop-dev-search"): "skip",              # Mon 30th: close
    (utc(1, 0, 12), "stop-dev-payments"): "skip",
}


class Aws:
    """boto3 against the test's moto server, as the test's own user sees it."""

    def __init__(self, env: dict[str, str]) -> None:
        kw = {"endpoint_url": env["AWS_ENDPOINT_URL"], "region_name": env["AWS_DEFAULT_REGION"],
              "aws_access_key_id": env["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"]}
        self.ec2 = boto3.client("ec2", **kw)
        self.s3 = boto3.client("s3", **kw)

    def instance(self, name: str, **tags: str) -> str:
        tag_list = [{"Key": "Name", "Value": name}, *({"Key": k, "Value": v} for k, v in tags.items())]
        answer = self.ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1, InstanceType="t3.micro",
                                        TagSpecifications=[{"ResourceType": "instance", "Tags": tag_list}])
        return answer["Instances"][0]["InstanceId"]

    def states(self) -> dict[str, str]:
        """Instance id -> state name, for every instance."""
        pages = self.ec2.get_paginator("describe_instances").paginate()
        return {i["InstanceId"]: i["State"]["Name"] for p in pages for r in p["Reservations"] for i in r["Instances"]}

    def report(self, key: str) -> dict[str, Any]:
        return json.loads(self.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())


@pytest.fixture
def aws(moto_server) -> Aws:
    aws = Aws(moto_server.env)
    aws.s3.create_bucket(Bucket=BUCKET)
    return aws


def next_fire(server: ExampleServer) -> tuple[float, set[str]]:
    """The earliest upcoming fire of any schedule the server has (other example
    workflows' too: the scheduler sleeps until the earliest), and whose it is."""
    upcoming = [(at(s["next_fires"][0]["at"]), s["name"]) for s in server.ok("GET", "/v1/schedules")["schedules"]
                if s["next_fires"] and not s["paused"]]
    first = min(t for t, _ in upcoming)
    return first, {name for t, name in upcoming if t == first}


def fire_record(server: ExampleServer, name: str, scheduled_at: float) -> dict[str, Any]:
    def recorded() -> dict[str, Any] | None:
        fires = server.ok("GET", f"/v1/schedules/{name}/fires?limit=20")["fires"]
        return next((f for f in fires if at(f["scheduled_at"]) == scheduled_at), None)
    return server.wait_for(recorded, f"the fire record of {name} at {scheduled_at}", timeout_s=30)


def test_stops_at_19_and_starts_at_07_per_team_except_in_the_month_end_close(tmp_path, nats_server, moto_server, aws):
    ids = {
        "payments": aws.instance("payments-api", env="dev", team="payments"),
        "search": aws.instance("search-indexer", env="dev", team="search"),
        "prod": aws.instance("payments-prod", env="prod", team="payments"),
        "other-team": aws.instance("ml-notebook", env="dev", team="ml"),
        "untagged": aws.instance("bastion"),
    }
    names = {v: k for k, v in ids.items()}
    running = {i: "running" for i in ids.values()}
    aws.ec2.start_instances(InstanceIds=list(ids.values()))  # moto creates them `pending`
    assert aws.states() == running

    server = ExampleServer(tmp_path / "baton", nats_server.url, clock_start=CLOCK_START,
                           **moto_server.env, FINOPS_REPORT_BUCKET=BUCKET)
    server.start()
    try:
        # The calendar shows ahead of time which stops it will skip, and why.
        view = server.ok("GET", "/v1/schedules/stop-dev-search")
        skips = {f["local"]: f["skip"] for f in view["next_fires"]}
        assert skips["2026-11-26T19:00:00+01:00"] is None
        assert "month-end-close" in skips["2026-11-27T19:00:00+01:00"]
        assert "month-end-close" in skips["2026-11-30T19:00:00+01:00"]

        expected_state = dict(running)
        seen: dict[tuple[float, str], Any] = {}
        while (fire := next_fire(server))[0] <= CLOCK_END:
            t, due = fire
            scheduler_wakes_at = min(t, server.now() + SCHEDULER_IDLE_S)
            server.wait_sleeping_until(scheduler_wakes_at, f"the scheduler to sleep until {scheduler_wakes_at}")
            server.set_clock(t)
            for name in sorted(due & set(MINE)):
                record = fire_record(server, name, t)
                expect = EXPECTED[(t, name)]
                if expect == "skip":
                    assert record["outcome"] == "skipped", record
                    close_day = datetime.fromtimestamp(t, NEW_YORK).date().isoformat()  # the calendar's zone
                    assert "month-end-close" in record["reason"] and close_day in record["reason"], record
                    assert record["run_id"] is None
                    assert aws.states() == expected_state
                    seen[(t, name)] = "skip"
                    continue
                assert record["outcome"] == "started", record
                run = server.wait_run(record["run_id"], timeout_s=60)
                assert run["status"] == "succeeded", server.log.read_text()[-3000:]
                action, team = name.split("-")[0], name.split("-")[-1]
                changed = {names[i] for i in run["output"]["changed"]}
                assert changed == expect, (name, run["output"])
                assert run["output"]["action"] == action and run["output"]["team"] == team
                for i in run["output"]["changed"]:
                    expected_state[i] = "stopped" if action == "stop" else "running"
                server.wait_for(lambda: aws.states() == expected_state, f"EC2 states after {name} at {t}", 30)
                check_report(aws, run, action, team, t, {ids[k] for k in expect})
                seen[(t, name)] = changed
            for name in due - set(MINE):  # another example's schedule: only the time matters here
                fire_record(server, name, t)

        assert seen.keys() == EXPECTED.keys()
        assert aws.states() == running  # the close kept the dev instances up; prod, ml, bastion never moved

        # Each schedule's fire records, newest first: the runs, and the skipped close days.
        def outcomes(name: str) -> list[tuple[float, str]]:
            fires = server.ok("GET", f"/v1/schedules/{name}/fires")["fires"]
            return [(at(f["scheduled_at"]), f["outcome"]) for f in fires]
        assert outcomes("stop-dev-search") == [(utc(30, 18), "skipped"), (utc(27, 18), "skipped"),
                                               (utc(26, 18), "started")]
        assert outcomes("stop-dev-payments") == [(utc(1, 0, 12), "skipped"), (utc(28, 0), "skipped"),
                                                 (utc(27, 0), "started")]
        assert outcomes("start-dev-payments") == [(utc(30, 12), "started"), (utc(27, 12), "started")]
        runs = server.runs(WORKFLOW)
        assert len(runs) == 6 and all(r["status"] == "succeeded" for r in runs)
    finally:
        server.stop()


def check_report(aws: Aws, run: dict[str, Any], action: str, team: str, t: float, changed: set[str]) -> None:
    bucket, _, key = run["output"]["report"].removeprefix("s3://").partition("/")
    assert bucket == BUCKET and key.startswith(f"nightly-dev-shutdown/{team}/")
    report = aws.report(key)
    assert report["action"] == action and report["team"] == team and report["env"] == "dev"
    assert report["run_id"] == run["run_id"]
    assert at(report["scheduled_at"]) == t
    assert {c["id"] for c in report["changed"]} == changed
    for c in report["changed"]:
        assert (c["from"], c["to"]) == (("running", "stopping") if action == "stop" else ("stopped", "pending")), c
    assert report["unchanged"] == []  # `find` picked only instances in the state to change


# --- the handlers on their own, against the same moto --------------------------------


def context(step: str) -> Context:
    return Context(workflow=WORKFLOW, version="1", workflow_id=None, run_id="run-1", step_id=step,
                   task_id=f"run-1/{step}", attempt=1, idempotency_key=f"run-1:{step}:1")


async def test_stop_leaves_alone_what_lost_its_tags_since_find(monkeypatch, moto_server, aws):
    for key, value in moto_server.env.items():
        monkeypatch.setenv(key, value)
    dev = aws.instance("payments-api", env="dev", team="payments")
    retagged = aws.instance("payments-db", env="dev", team="payments")
    aws.ec2.start_instances(InstanceIds=[dev, retagged])
    found = await finops.find_instances(context("find"), team="payments", action="stop")
    assert sorted(found["instance_ids"]) == sorted([dev, retagged])

    # Between find and stop, someone promotes one to prod.
    await asyncio.to_thread(aws.ec2.create_tags, Resources=[retagged], Tags=[{"Key": "env", "Value": "prod"}])
    result = await finops.stop_instances(context("stop"), instance_ids=found["instance_ids"], team="payments")
    assert [c["id"] for c in result["changed"]] == [dev]
    assert result["unchanged"] == [{"id": retagged, "name": None, "state": None,
                                    "why": "no longer tagged env=dev, team=payments"}]
    assert aws.states() == {dev: "stopped", retagged: "running"}

    # Again (a retried attempt): nothing more to do, and no error.
    again = await finops.stop_instances(context("stop"), instance_ids=found["instance_ids"], team="payments")
    assert again["changed"] == []
    assert {u["id"]: u["why"] for u in again["unchanged"]}[dev] == "is stopped"


async def test_without_credentials_the_step_fails_at_once_saying_what_to_set(monkeypatch, tmp_path):
    for key in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # not on an EC2 host: do not ask its metadata service
    with pytest.raises(NonRetryableError) as failed:
        await finops.find_instances(context("find"), team="payments", action="stop")
    assert failed.value.type == "AwsCredentialsMissing"
    assert "AWS_ACCESS_KEY_ID" in failed.value.message and "AWS_ENDPOINT_URL" in failed.value.message
