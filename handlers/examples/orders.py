"""Order saga: reserve stock, charge, ship; release and refund undo the first two."""

from __future__ import annotations

import hashlib
from typing import Any

from handlers.context import Context, NonRetryableError
from handlers.registry import handler


def stable_id(prefix: str, ctx: Context) -> str:
    # From run and step, not ctx.idempotency_key: that key includes the attempt
    # number, and a retried attempt must find the same reservation or charge.
    digest = hashlib.sha256(f"{ctx.run_id}:{ctx.step_id}".encode()).hexdigest()
    return f"{prefix}_{digest[:12]}"


@handler("orders.reserve")
async def reserve(ctx: Context, order_id: str, items: list[Any] | None = None) -> dict[str, Any]:
    reservation_id = stable_id("res", ctx)
    ctx.logger.info("reserved stock for order %s as %s", order_id, reservation_id)
    return {"order_id": order_id, "reservation_id": reservation_id, "items": items or []}


@handler("orders.release")
async def release(ctx: Context, order_id: str, reservation_id: str | None = None) -> dict[str, Any]:
    ctx.logger.info("released reservation %s of order %s", reservation_id, order_id)
    return {"order_id": order_id, "released": True}


@handler("orders.charge")
async def charge(ctx: Context, order_id: str, amount: float, fail: bool = False) -> dict[str, Any]:
    if fail:
        raise NonRetryableError("card declined", type="PaymentDeclined", details={"order_id": order_id})
    charge_id = stable_id("ch", ctx)
    ctx.logger.info("charged %s for order %s as %s", amount, order_id, charge_id)
    return {"order_id": order_id, "charge_id": charge_id, "amount": amount}


@handler("orders.refund")
async def refund(
    ctx: Context, order_id: str, amount: float | None = None, charge_id: str | None = None
) -> dict[str, Any]:
    ctx.logger.info("refunded %s of charge %s for order %s", amount, charge_id, order_id)
    return {"order_id": order_id, "refunded": amount, "charge_id": charge_id}


@handler("orders.ship")
async def ship(ctx: Context, order_id: str, fail: bool = False) -> dict[str, Any]:
    if fail:
        raise NonRetryableError("carrier rejected the shipment")
    tracking = stable_id("trk", ctx)
    ctx.logger.info("shipped order %s, tracking %s", order_id, tracking)
    return {"order_id": order_id, "tracking": tracking}
