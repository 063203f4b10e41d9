"""Deploy with approval (config/workflows/deploy-with-approval.yaml): ask CI whether the
build passed, apply the release, shift traffic, check the error rate; roll back and
restore traffic when the deploy or its verification fails.

The services are found through the environment, as a deployment configures them:

    DEPLOY_API_URL   the deploy API (releases, traffic)   default http://127.0.0.1:8090/deploy
    CI_API_URL       the CI system's API                  default $DEPLOY_API_URL/ci
    PROMETHEUS_URL   a Prometheus-compatible query API    default $DEPLOY_API_URL/prometheus

(the defaults are the stand-ins of `python -m handlers.examples.standins`). Each call
that changes something sends an Idempotency-Key that is the same for every attempt of
the step, so a retry, or a re-run after a crash, is applied once.
"""

from __future__ import annotations

import os
from typing import Any

import aiohttp

from handlers.context import Context, NonRetryableError
from handlers.registry import handler

DEFAULT_DEPLOY_API_URL = "http://127.0.0.1:8090/deploy"
REQUEST_TIMEOUT_S = 10.0  # one HTTP call; the step's own timeout bounds the attempt


class ServiceUnavailable(Exception):
    """A retryable failure: the service is down, timed out or answered 5xx/429."""


class BuildPending(Exception):
    """The build is still running: retried under the step's policy until it finishes."""


def deploy_api() -> str:
    return os.environ.get("DEPLOY_API_URL", DEFAULT_DEPLOY_API_URL).rstrip("/")


def ci_api() -> str:
    return os.environ.get("CI_API_URL", f"{deploy_api()}/ci").rstrip("/")


def prometheus() -> str:
    return os.environ.get("PROMETHEUS_URL", f"{deploy_api()}/prometheus").rstrip("/")


def step_key(ctx: Context) -> str:
    """The step's Idempotency-Key: from run and step, not ctx.idempotency_key (that one
    counts attempts, and a retry must find the release the lost attempt made). The
    compensation has a key of its own: it undoes, so it is another request."""
    return f"{ctx.run_id}:{ctx.step_id}:compensate" if ctx.compensation else f"{ctx.run_id}:{ctx.step_id}"


async def call(method: str, url: str, *, json: Any = None, params: dict[str, str] | None = None,
               key: str | None = None) -> Any:
    """One JSON call. 5xx, 429, timeouts and refused connections are retried (the step's
    policy); any other 4xx is a mistake a retry would repeat."""
    headers = {"Idempotency-Key": key} if key else {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as session:
            async with session.request(method, url, json=json, params=params, headers=headers) as resp:
                body = await resp.json(content_type=None)
                status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ServiceUnavailable(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
    except ValueError:
        raise ServiceUnavailable(f"{method} {url}: the answer is not JSON") from None
    if status >= 500 or status == 429:
        raise ServiceUnavailable(f"{method} {url}: HTTP {status}: {body}")
    if status >= 400:
        raise NonRetryableError(f"{method} {url}: HTTP {status}: {body}", type="HttpError", details={"status": status})
    return body


@handler("deploy.check_build")
async def check_build(ctx: Context, service: str, version: str, commit: str | None = None) -> dict[str, Any]:
    """The CI build of `commit` (else of the tag `version`) must have passed: a failed
    build fails the run before anything is deployed; a running one is asked again."""
    ref = commit or version
    build = await call("GET", f"{ci_api()}/builds/{ref}", params={"service": service})
    if build["status"] == "running":
        raise BuildPending(f"the build of {ref} is still running")
    if build["status"] != "passed":
        raise NonRetryableError(f"the build of {service} {version} ({ref}) {build['status']}: nothing deployed",
                                type="BuildFailed", details={"ref": ref, "status": build["status"]})
    ctx.logger.info("build of %s %s (%s) passed: %s", service, version, ref, build["image"])
    return {"ref": ref, "image": build["image"]}


@handler("deploy.apply")
async def apply(ctx: Context, service: str, version: str, image: str) -> dict[str, Any]:
    """Make `version` the running release; returns the release it replaced and where its health is."""
    release = await call("POST", f"{deploy_api()}/releases", key=step_key(ctx),
                         json={"service": service, "version": version, "image": image})
    ctx.logger.info("released %s %s (was %s)", service, version, release["previous"])
    return {"service": service, "version": version, "previous": release["previous"],
            "health_url": release["health_url"]}


@handler("deploy.rollback")
async def rollback(ctx: Context, service: str, version: str, to: str | None) -> dict[str, Any]:
    """Compensation of deploy.apply: the release that ran before runs again."""
    await call("POST", f"{deploy_api()}/releases/{service}/rollback", key=step_key(ctx),
               json={"to": to, "from": version})
    ctx.logger.warning("rolled %s back from %s to %s", service, version, to)
    return {"service": service, "release": to, "rolled_back": version}


@handler("deploy.shift_traffic")
async def shift_traffic(ctx: Context, service: str, weights: dict[str, int]) -> dict[str, Any]:
    """Route `service`'s traffic by `weights` ({version: percent}); returns the weights it replaced."""
    answer = await call("PUT", f"{deploy_api()}/traffic/{service}", key=step_key(ctx), json={"weights": weights})
    ctx.logger.info("traffic of %s now %s (was %s)", service, answer["weights"], answer["previous"])
    return {"service": service, "weights": answer["weights"], "previous": answer["previous"]}


@handler("deploy.verify")
async def verify(ctx: Context, service: str, version: str, max_error_rate: float = 0.01,
                 window: str = "5m") -> dict[str, Any]:
    """The share of 5xx answers of `service` at `version` over `window` must stay under
    `max_error_rate` (a Prometheus instant query). Above it the step fails at once: a
    second look would not make the deploy good."""
    selector = f'service="{service}",version="{version}"'
    promql = (f'sum(rate(http_requests_total{{{selector},code=~"5.."}}[{window}]))'
              f' / sum(rate(http_requests_total{{{selector}}}[{window}]))')
    answer = await call("GET", f"{prometheus()}/api/v1/query", params={"query": promql})
    result = answer["data"]["result"]
    rate = float(result[0]["value"][1]) if result else 0.0  # no series: no requests, so none failed
    if rate > max_error_rate:
        raise NonRetryableError(f"error rate of {service} {version} is {rate:.2%}, above {max_error_rate:.2%}",
                                type="ErrorRateTooHigh", details={"error_rate": rate, "max": max_error_rate})
    ctx.logger.info("error rate of %s %s: %.3f%% (max %.3f%%)", service, version, rate * 100, max_error_rate * 100)
    return {"error_rate": rate, "max_error_rate": max_error_rate, "query": promql}
