"""Deploy pipeline: build, apply, verify; rollback undoes apply."""

from __future__ import annotations

import hashlib
from typing import Any

from handlers.context import Context
from handlers.registry import handler


class DeployFailed(Exception):
    """A retryable apply failure, so the demo shows retries before the rollback."""


@handler("deploy.build")
async def build(ctx: Context, service: str, version: str) -> dict[str, Any]:
    digest = hashlib.sha256(f"{service}:{version}".encode()).hexdigest()
    image = f"registry.local/{service}:{version}"
    ctx.logger.info("built %s", image)
    return {"image": image, "digest": f"sha256:{digest}"}


@handler("deploy.apply")
async def apply(ctx: Context, service: str, version: str, fail: bool = False) -> dict[str, Any]:
    if fail:
        raise DeployFailed(f"{service} {version} did not become ready")
    ctx.logger.info("applied %s %s", service, version)
    return {"service": service, "version": version, "applied": True}


@handler("deploy.rollback")
async def rollback(ctx: Context, service: str, version: str) -> dict[str, Any]:
    ctx.logger.info("rolled back %s from %s", service, version)
    return {"service": service, "rolled_back_from": version}


@handler("deploy.verify")
async def verify(ctx: Context, service: str) -> dict[str, Any]:
    ctx.logger.info("verified %s", service)
    return {"service": service, "healthy": True}
