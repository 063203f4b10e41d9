"""Nightly dev shutdown (config/workflows/nightly-dev-shutdown.yaml): find a team's
tagged EC2 instances, stop or start them, write a report to S3. With boto3, as a
user's own script would.

AWS is configured the standard way, from the environment (or the run's input):
credentials as boto3 finds them (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
an instance or task role), the region from AWS_DEFAULT_REGION or the input's `region`,
and AWS_ENDPOINT_URL to talk to an emulator such as moto instead of AWS.

boto3 blocks, so every call runs in a thread (`asyncio.to_thread`). Its errors are
mapped once, in `_aws`: what a retry cannot fix (no credentials, no region, access
denied, no such bucket) fails the step at once with a message that says what to set;
throttling, 5xx and unreachable endpoints are retried by the step's retry policy.

Idempotency: StopInstances and StartInstances take no ClientToken (only RunInstances
and a few create calls do), and need none: stopping a stopped instance, or starting a
running one, changes nothing and reports its state. The report's S3 key is derived
from the run, so a retried attempt overwrites the same object.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from typing import Any

import boto3
import botocore.exceptions
from botocore.config import Config

from handlers.context import Context, NonRetryableError
from handlers.registry import handler

# Where reports go unless the run's input names a bucket.
REPORT_BUCKET_ENV = "FINOPS_REPORT_BUCKET"
DEFAULT_REPORT_BUCKET = "finops-reports"
REPORT_PREFIX = "nightly-dev-shutdown"

# The states an action changes: a `stop` stops running (or still booting) instances; a
# `start` starts stopped ones. An instance still `stopping` cannot be started yet.
FROM_STATES = {"stop": ("pending", "running"), "start": ("stopped",)}

# boto3 retries throttling itself ("standard" mode); the step's policy handles the rest.
# Short connect timeout: an unreachable endpoint should fail the attempt, not hang it.
_BOTO_CONFIG = Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5, read_timeout=30)

# ClientError codes worth another attempt; other 4xx answers will not change on a retry.
_RETRYABLE_CODES = {"Throttling", "ThrottlingException", "RequestLimitExceeded", "InternalError",
                    "ServiceUnavailable", "IncorrectInstanceState", "SlowDown"}

_NO_CREDENTIALS = ("no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or run "
                   "Baton with an IAM role); to try it without AWS, also set AWS_ENDPOINT_URL to a moto server")


class AwsUnreachable(Exception):
    """The AWS endpoint did not answer (retryable: it may be back on the next attempt)."""


def _client(service: str, region: str | None) -> Any:
    # A session per call: boto3's default session is not safe to share between threads.
    return boto3.session.Session().client(service, region_name=region or None, config=_BOTO_CONFIG)


async def _aws(what: str, call: Callable[[], Any]) -> Any:
    """Run one blocking boto3 `call` in a thread, mapping its errors for the step."""
    try:
        return await asyncio.to_thread(call)
    except (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError):
        raise NonRetryableError(f"{what}: {_NO_CREDENTIALS}", type="AwsCredentialsMissing") from None
    except botocore.exceptions.NoRegionError:
        raise NonRetryableError(f"{what}: no AWS region: set AWS_DEFAULT_REGION or the run's input `region`",
                                type="AwsRegionMissing") from None
    except botocore.exceptions.EndpointConnectionError as exc:
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        hint = f" (AWS_ENDPOINT_URL={endpoint}: is it running?)" if endpoint else ""
        raise AwsUnreachable(f"{what}: cannot reach {exc.kwargs.get('endpoint_url')}{hint}") from None
    except botocore.exceptions.ClientError as exc:
        error = exc.response.get("Error", {})
        code = error.get("Code", "ClientError")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 400)
        message = f"{what}: {code}: {error.get('Message', exc)}"
        if code in _RETRYABLE_CODES or status >= 500:
            raise
        if code == "NoSuchBucket":
            message += f" (create it, or set {REPORT_BUCKET_ENV} or the run's input `report_bucket`)"
        raise NonRetryableError(message, type=code) from None


def _tag_filters(team: str, env: str) -> list[dict[str, Any]]:
    return [{"Name": "tag:env", "Values": [env]}, {"Name": "tag:team", "Values": [team]}]


def _describe(region: str | None, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every instance the filters match, across pages: id, Name tag, state."""
    pages = _client("ec2", region).get_paginator("describe_instances").paginate(Filters=filters)
    found = []
    for page in pages:
        for reservation in page["Reservations"]:
            for inst in reservation["Instances"]:
                tags = {t["Key"]: t["Value"] for t in inst.get("Tags", [])}
                found.append({"id": inst["InstanceId"], "name": tags.get("Name"), "state": inst["State"]["Name"]})
    return sorted(found, key=lambda i: i["id"])


def _check_action(action: str) -> None:
    if action not in FROM_STATES:
        raise NonRetryableError(f"action must be 'stop' or 'start', not {action!r}", type="InvalidInput")


@handler("finops.find_instances")
async def find_instances(ctx: Context, team: str, action: str, env: str = "dev",
                         region: str | None = None) -> dict[str, Any]:
    """The instances tagged env=<env> and team=<team> that `action` would change."""
    _check_action(action)
    filters = [*_tag_filters(team, env), {"Name": "instance-state-name", "Values": list(FROM_STATES[action])}]
    found = await _aws("ec2:DescribeInstances", lambda: _describe(region, filters))
    ctx.logger.info("%d instance(s) of team %s (env=%s) to %s", len(found), team, env, action)
    return {"instance_ids": [i["id"] for i in found], "instances": found}


async def _switch(ctx: Context, action: str, instance_ids: list[str], team: str, env: str,
                  region: str | None) -> dict[str, Any]:
    # Look again right before acting: an instance re-tagged (say, to env=prod) or
    # started by hand since `find` ran must be left alone.
    filters = [*_tag_filters(team, env), {"Name": "instance-id", "Values": list(instance_ids)}]
    current = await _aws("ec2:DescribeInstances", lambda: _describe(region, filters)) if instance_ids else []
    todo = [i for i in current if i["state"] in FROM_STATES[action]]
    matched = {i["id"] for i in current}
    unchanged = [{"id": i["id"], "name": i["name"], "state": i["state"], "why": f"is {i['state']}"}
                 for i in current if i["state"] not in FROM_STATES[action]]
    unchanged += [{"id": i, "name": None, "state": None, "why": f"no longer tagged env={env}, team={team}"}
                  for i in instance_ids if i not in matched]
    changed: list[dict[str, Any]] = []
    if todo:
        ids = [i["id"] for i in todo]
        if action == "stop":
            answer = await _aws("ec2:StopInstances", lambda: _client("ec2", region).stop_instances(InstanceIds=ids))
            transitions = answer["StoppingInstances"]
        else:
            answer = await _aws("ec2:StartInstances", lambda: _client("ec2", region).start_instances(InstanceIds=ids))
            transitions = answer["StartingInstances"]
        names = {i["id"]: i["name"] for i in todo}
        changed = sorted(({"id": t["InstanceId"], "name": names.get(t["InstanceId"]),
                           "from": t["PreviousState"]["Name"], "to": t["CurrentState"]["Name"]}
                          for t in transitions), key=lambda c: c["id"])
    ctx.logger.info("%s: %d instance(s) of team %s, %d unchanged", action, len(changed), team, len(unchanged))
    return {"action": action, "changed": changed, "unchanged": sorted(unchanged, key=lambda u: u["id"])}


@handler("finops.stop_instances")
async def stop_instances(ctx: Context, instance_ids: list[str], team: str, env: str = "dev",
                         region: str | None = None) -> dict[str, Any]:
    """Stop those of `instance_ids` that still carry the tags and are running."""
    return await _switch(ctx, "stop", instance_ids, team, env, region)


@handler("finops.start_instances")
async def start_instances(ctx: Context, instance_ids: list[str], team: str, env: str = "dev",
                          region: str | None = None) -> dict[str, Any]:
    """Start those of `instance_ids` that still carry the tags and are stopped."""
    return await _switch(ctx, "start", instance_ids, team, env, region)


@handler("finops.write_report")
async def write_report(ctx: Context, action: str, team: str, result: dict[str, Any], env: str = "dev",
                       region: str | None = None, scheduled_at: str | None = None,
                       bucket: str | None = None) -> dict[str, Any]:
    """Write what `action` changed as a JSON object to S3; the output names it."""
    bucket = bucket or os.environ.get(REPORT_BUCKET_ENV) or DEFAULT_REPORT_BUCKET
    # From the run, not the attempt: a retry overwrites the same object.
    stamp = scheduled_at or "manual"
    key = f"{REPORT_PREFIX}/{team}/{stamp}-{action}-{ctx.run_id}.json"
    report = {
        "workflow": ctx.workflow, "run_id": ctx.run_id, "team": team, "env": env, "action": action,
        "scheduled_at": scheduled_at, "changed": result.get("changed", []), "unchanged": result.get("unchanged", []),
    }
    body = json.dumps(report, indent=2).encode()
    await _aws("s3:PutObject", lambda: _client("s3", region).put_object(Bucket=bucket, Key=key, Body=body,
                                                                        ContentType="application/json"))
    ids = [c["id"] for c in report["changed"]]
    ctx.logger.info("report s3://%s/%s: %s %s", bucket, key, action, ", ".join(ids) or "nothing")
    return {"bucket": bucket, "key": key, "url": f"s3://{bucket}/{key}", "changed": ids}
