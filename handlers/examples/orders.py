"""Order saga: reserve stock, charge the card, ship; release and refund undo the first two.

The shop's inventory, payment and shipping services are HTTP APIs under SHOP_API_URL
(default: the stand-ins of `python -m handlers.examples.standins`). A 5xx, a timeout or
a refused connection is raised as is, so the step's retry policy tries again; an answer
that will not change on retry (card declined, out of stock, undeliverable) is a
NonRetryableError, so the saga compensates at once.

Every call that changes something can be repeated safely: a reservation is a PUT of an
id derived from the run and step; payments and shipping get an `Idempotency-Key` that is
the same for every attempt of the step and after a crash of Baton (`step_key`), so a
charge whose answer was lost is not charged twice when the step runs again.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import aiohttp

from handlers.context import Context, NonRetryableError
from handlers.registry import handler

DEFAULT_SHOP_API_URL = "http://127.0.0.1:8090/shop"
TIMEOUT_S = 10.0  # per request; below the step timeout (30s), so a slow service is retried


def shop_url(path: str) -> str:
    return os.environ.get("SHOP_API_URL", DEFAULT_SHOP_API_URL).rstrip("/") + path


def step_key(ctx: Context, run_attempt: int = 1) -> str:
    """The idempotency key of the step as a whole. Not ctx.idempotency_key: that one
    counts attempts, and a retried attempt must find the charge the last one made.
    `run_attempt` (the template's `run.attempt`) changes only on `baton retry`, which
    reruns compensated steps: a refunded charge must not be replayed then."""
    key = f"{ctx.run_id}:{ctx.step_id}:run{run_attempt}"
    return f"{key}:compensate" if ctx.compensation else key


def stable_id(prefix: str, ctx: Context, run_attempt: int = 1) -> str:
    digest = hashlib.sha256(step_key(ctx, run_attempt).encode()).hexdigest()
    return f"{prefix}_{digest[:12]}"


class ShopUnavailable(Exception):
    """A 5xx from the shop: retried under the step's policy."""


async def call(ctx: Context, method: str, path: str, body: Any = None, *, key: str | None = None,
               final: dict[int, str] | None = None) -> tuple[Any, bool]:
    """One request to the shop: (its answer, whether it replays an earlier answer to
    `key`). A 4xx fails the step for good, with the error type `final` names for its
    status; a 5xx, a timeout or a refused connection is raised to be retried."""
    headers = {"Idempotency-Key": key} if key else {}
    if ctx.traceparent:  # W3C Trace Context: the shop's spans join the run's trace
        headers["traceparent"] = ctx.traceparent
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as session:
        async with session.request(method, shop_url(path), json=body, headers=headers) as resp:
            answer = await resp.json(content_type=None)
            if resp.status < 400:
                return answer, resp.headers.get("Idempotent-Replayed") == "true"
    error = answer.get("error", {}) if isinstance(answer, dict) else {}
    message = f"{method} {path}: {resp.status} {error.get('message', answer)}"
    if resp.status >= 500:
        raise ShopUnavailable(message)
    raise NonRetryableError(message, type=(final or {}).get(resp.status, "ShopRequestRejected"),
                            details={"status": resp.status, "code": error.get("code")})


@handler("orders.reserve")
async def reserve(ctx: Context, order_id: str, items: list[str] | None = None, run_attempt: int = 1) -> dict[str, Any]:
    reservation_id = stable_id("res", ctx, run_attempt)
    answer, _ = await call(ctx, "PUT", f"/inventory/reservations/{reservation_id}",
                           {"order_id": order_id, "items": items or []}, final={409: "OutOfStock"})
    ctx.logger.info("reserved %s for order %s as %s", items or [], order_id, reservation_id)
    return {"order_id": order_id, "reservation_id": reservation_id, "items": answer["items"]}


@handler("orders.release")
async def release(ctx: Context, order_id: str, reservation_id: str) -> dict[str, Any]:
    await call(ctx, "DELETE", f"/inventory/reservations/{reservation_id}")  # idempotent: a repeat is a no-op
    ctx.logger.info("released reservation %s of order %s", reservation_id, order_id)
    return {"order_id": order_id, "reservation_id": reservation_id, "released": True}


@handler("orders.charge")
async def charge(ctx: Context, order_id: str, amount: float, card: str = "tok_visa",
                 run_attempt: int = 1) -> dict[str, Any]:
    key = step_key(ctx, run_attempt)
    answer, replayed = await call(ctx, "POST", "/payments/charges", {"order_id": order_id, "amount": amount, "card": card},
                                key=key, final={402: "PaymentDeclined"})
    ctx.logger.info("charged %s for order %s as %s%s", amount, order_id, answer["charge_id"],
                    " (an earlier attempt's charge)" if replayed else "")
    return {"order_id": order_id, "charge_id": answer["charge_id"], "amount": answer["amount"], "idempotency_key": key}


@handler("orders.refund")
async def refund(ctx: Context, order_id: str, charge_id: str, amount: float, run_attempt: int = 1) -> dict[str, Any]:
    answer, _ = await call(ctx, "POST", "/payments/refunds",
                           {"order_id": order_id, "charge_id": charge_id, "amount": amount},
                           key=step_key(ctx, run_attempt))
    ctx.logger.info("refunded %s of charge %s for order %s", amount, charge_id, order_id)
    return {"order_id": order_id, "refund_id": answer["refund_id"], "charge_id": charge_id, "amount": amount}


@handler("orders.ship")
async def ship(ctx: Context, order_id: str, reservation_id: str, country: str = "US",
               run_attempt: int = 1) -> dict[str, Any]:
    answer, _ = await call(ctx, "POST", "/shipping/shipments",
                           {"order_id": order_id, "reservation_id": reservation_id, "country": country},
                           key=step_key(ctx, run_attempt), final={422: "Undeliverable"})
    ctx.logger.info("shipped order %s, tracking %s", order_id, answer["tracking"])
    return {"order_id": order_id, "shipment_id": answer["shipment_id"], "tracking": answer["tracking"]}
