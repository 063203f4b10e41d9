"""A shop's inventory, payments and shipping, as the order-saga handlers call them.

    PUT    /inventory/reservations/{id}   {"order_id", "items": [sku, ...]}    201; 409 out of stock
    DELETE /inventory/reservations/{id}                                         200, also if already released
    POST   /payments/charges              {"order_id", "amount", "card"}        201; 402 card declined
    POST   /payments/refunds              {"charge_id", "amount"}               201; 404 unknown charge
    POST   /shipping/shipments            {"order_id", "reservation_id", "country"}  201; 422 undeliverable

Payments and shipping require an `Idempotency-Key` header and behave as Stripe's API
does: the first answer given for a key is stored, and a request repeating the key gets
that answer again (header `Idempotent-Replayed: true`) without charging, refunding or
shipping a second time; the same key with other parameters is a 400. Card
`tok_chargeDeclined` is always declined (as Stripe's test card is) and the carrier does
not ship to `AQ`, so failures can be tried from the command line.

Switches for tests: `decline_cards`, `fail_shipping`, and `hold(op)`, which holds the
next request of an operation (before or after its effect) until the test releases it,
so a test can kill Baton while the request is in flight.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

OPS = ("reserve", "release", "charge", "refund", "ship")


class Hold:
    """Holds the next request of one operation. `arrived` is set once it is held; the
    request waits until `release()` (then it answers) or `drop()` (then it does nothing
    more and answers 503). With `after`, the effect happens first: the service charged,
    say, but the caller has not heard the answer yet."""

    def __init__(self, op: str, after: bool) -> None:
        self.op = op
        self.after = after
        self.arrived = threading.Event()
        self._lock = threading.Lock()
        self._outcome: str | None = None  # "release" | "drop" once decided
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def wait(self) -> bool:
        """Hold the caller; True to carry on, False if dropped."""
        event = asyncio.Event()
        with self._lock:
            if self._outcome is None:
                self._waiters.append((asyncio.get_running_loop(), event))
        self.arrived.set()
        if self._outcome is None:
            await event.wait()
        return self._outcome == "release"

    def release(self) -> None:
        self._decide("release")

    def drop(self) -> None:
        self._decide("drop")

    def _decide(self, outcome: str) -> None:
        with self._lock:
            if self._outcome is None:
                self._outcome = outcome
            waiters, self._waiters = self._waiters, []
        for loop, event in waiters:
            loop.call_soon_threadsafe(event.set)


@dataclass
class State:
    """What the shop holds. Every dict is keyed as the service keys it; `calls` is the
    ordered log of requests as `(op, order_id, details)`, replays included."""

    stock: dict[str, int] = field(default_factory=lambda: {"widget": 100, "gadget": 100, "gizmo": 3})
    reservations: dict[str, dict[str, Any]] = field(default_factory=dict)  # by reservation id
    charges: dict[str, dict[str, Any]] = field(default_factory=dict)       # by idempotency key
    refunds: dict[str, dict[str, Any]] = field(default_factory=dict)       # by idempotency key
    shipments: dict[str, dict[str, Any]] = field(default_factory=dict)     # by idempotency key
    calls: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    decline_cards: set[str] = field(default_factory=lambda: {"tok_chargeDeclined"})
    no_service_countries: set[str] = field(default_factory=lambda: {"AQ"})
    fail_shipping: bool = False  # the carrier rejects every shipment (422)
    holds: dict[str, Hold] = field(default_factory=dict)  # by op, until it has held one request
    every_hold: list[Hold] = field(default_factory=list)
    # the first answer (status, body, request params) given for each idempotency key
    answers: dict[str, tuple[int, Any, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    # --- for tests ----------------------------------------------------------------------

    def hold(self, op: str, *, after: bool = False) -> Hold:
        assert op in OPS, op
        hold = self.holds[op] = Hold(op, after)
        self.every_hold.append(hold)
        return hold

    def drop_holds(self) -> None:
        """Let every held request end without its effect (a test's teardown)."""
        for hold in self.every_hold:
            hold.drop()

    def ops(self, order_id: str) -> list[str]:
        with self.lock:
            return [op for op, order, _ in self.calls if order == order_id]

    def charges_of(self, order_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [c for c in self.charges.values() if c["order_id"] == order_id]

    def refunds_of(self, order_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.refunds.values() if r["order_id"] == order_id]

    def shipments_of(self, order_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.shipments.values() if s["order_id"] == order_id]

    # --- the service ----------------------------------------------------------------------

    def new_id(self, prefix: str) -> str:
        return f"{prefix}_{next(self._ids):06d}"

    def log(self, op: str, order_id: str, **details: Any) -> None:
        with self.lock:
            self.calls.append((op, order_id, details))


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


async def _held(state: State, op: str, after: bool) -> bool:
    """Hold this request if a hold of `op` at this point waits for one; False if dropped."""
    hold = state.holds.get(op)
    if hold is None or hold.after != after:
        return True
    del state.holds[op]  # one request only: the one after a restart goes through
    return await hold.wait()


async def _idempotent(request: web.Request, state: State, op: str, effect) -> web.Response:
    """Stripe's idempotency: the first answer for a key is the answer for every repeat."""
    key = request.headers.get("Idempotency-Key")
    if not key:
        return _error(400, "missing_idempotency_key", "send an Idempotency-Key header")
    params = await request.json()
    order_id = str(params.get("order_id", ""))
    with state.lock:
        first = state.answers.get(key)
    if first is not None:
        status, body, first_params = first
        state.log(op, order_id, key=key, replayed=True)
        if first_params != params:
            return _error(400, "idempotency_error", f"key {key} was first used with other parameters")
        return web.json_response(body, status=status, headers={"Idempotent-Replayed": "true"})
    if not await _held(state, op, after=False):
        return _error(503, "unavailable", "dropped")
    state.log(op, order_id, key=key, replayed=False)
    status, body = effect(key, params)
    if status < 500:
        with state.lock:
            state.answers.setdefault(key, (status, body, params))
    if not await _held(state, op, after=True):
        return _error(503, "unavailable", "dropped")
    return web.json_response(body, status=status)


def make_app(state: State) -> web.Application:
    async def reserve(request: web.Request) -> web.Response:
        reservation_id = request.match_info["id"]
        params = await request.json()
        order_id, items = str(params.get("order_id", "")), list(params.get("items") or [])
        if not await _held(state, "reserve", after=False):
            return _error(503, "unavailable", "dropped")
        state.log("reserve", order_id, reservation_id=reservation_id, items=items)
        with state.lock:
            if reservation_id in state.reservations:  # PUT of the same id: already done
                return web.json_response(state.reservations[reservation_id], status=200)
            short = [sku for sku in set(items) if state.stock.get(sku, 0) < items.count(sku)]
            if short:
                return _error(409, "out_of_stock", f"not enough stock of {', '.join(sorted(short))}")
            for sku in items:
                state.stock[sku] -= 1
            reservation = {"reservation_id": reservation_id, "order_id": order_id, "items": items, "status": "held"}
            state.reservations[reservation_id] = reservation
        return web.json_response(reservation, status=201)

    async def release(request: web.Request) -> web.Response:
        reservation_id = request.match_info["id"]
        if not await _held(state, "release", after=False):
            return _error(503, "unavailable", "dropped")
        with state.lock:
            reservation = state.reservations.get(reservation_id)
            if reservation is not None and reservation["status"] == "held":
                for sku in reservation["items"]:
                    state.stock[sku] += 1
                reservation["status"] = "released"
        state.log("release", reservation["order_id"] if reservation else "", reservation_id=reservation_id)
        return web.json_response({"reservation_id": reservation_id, "status": "released"})

    def do_charge(key: str, params: dict[str, Any]) -> tuple[int, Any]:
        card = params.get("card", "tok_visa")
        if card in state.decline_cards:
            return 402, {"error": {"code": "card_declined", "message": "Your card was declined."}}
        charge = {"charge_id": state.new_id("ch"), "order_id": params["order_id"], "amount": params["amount"],
                  "status": "succeeded", "idempotency_key": key}
        with state.lock:
            state.charges[key] = charge
        return 201, charge

    def do_refund(key: str, params: dict[str, Any]) -> tuple[int, Any]:
        with state.lock:
            charge = next((c for c in state.charges.values() if c["charge_id"] == params.get("charge_id")), None)
            if charge is None:
                return 404, {"error": {"code": "resource_missing", "message": f"no charge {params.get('charge_id')}"}}
            refund = {"refund_id": state.new_id("re"), "charge_id": charge["charge_id"], "order_id": charge["order_id"],
                      "amount": params.get("amount", charge["amount"]), "idempotency_key": key}
            state.refunds[key] = refund
        return 201, refund

    def do_ship(key: str, params: dict[str, Any]) -> tuple[int, Any]:
        country = params.get("country", "US")
        if state.fail_shipping or country in state.no_service_countries:
            return 422, {"error": {"code": "undeliverable", "message": f"the carrier does not ship order "
                                                                      f"{params.get('order_id')} to {country}"}}
        shipment = {"shipment_id": state.new_id("shp"), "order_id": params["order_id"],
                    "reservation_id": params.get("reservation_id"), "country": country,
                    "tracking": state.new_id("1Z"), "idempotency_key": key}
        with state.lock:
            state.shipments[key] = shipment
        return 201, shipment

    async def charge(request: web.Request) -> web.Response:
        return await _idempotent(request, state, "charge", do_charge)

    async def refund(request: web.Request) -> web.Response:
        return await _idempotent(request, state, "refund", do_refund)

    async def ship(request: web.Request) -> web.Response:
        return await _idempotent(request, state, "ship", do_ship)

    app = web.Application()
    app.router.add_put("/inventory/reservations/{id}", reserve)
    app.router.add_delete("/inventory/reservations/{id}", release)
    app.router.add_post("/payments/charges", charge)
    app.router.add_post("/payments/refunds", refund)
    app.router.add_post("/shipping/shipments", ship)
    return app
