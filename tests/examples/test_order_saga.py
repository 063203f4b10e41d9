"""Order saga (config/workflows/order-saga.yaml): an `orders.created` CloudEvent on NATS
reserves stock, charges the card and ships, against the shop stand-in over HTTP. A
declined card or a rejected shipment compensates in reverse order; a SIGKILL of Baton
between charge and ship, or while the charge's answer is on its way, charges once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest

from handlers.examples.standins.shop import State
from tests.examples.support import ExampleServer, StandInServices

SUBJECT = "orders.created"
EVENTS_STREAM, EVENTS_CONSUMER = "BATON_EVENTS", "baton-triggers"  # Baton's trigger stream and consumer
BOUND_S = 60.0  # generous: a loaded 2-core machine


@pytest.fixture
def services() -> Iterator[StandInServices]:
    services = StandInServices("shop").start()
    try:
        yield services
    finally:
        services.states["shop"].drop_holds()  # a request still held answers and ends
        services.stop()


@pytest.fixture
def shop(services: StandInServices) -> State:
    return services.states["shop"]


@pytest.fixture
def start_baton(tmp_path: Path, nats_server, services: StandInServices) -> Iterator[Callable[[], ExampleServer]]:
    """Starts Baton on the test's data dir; a second call after a kill is the restart."""
    started: list[ExampleServer] = []

    def start() -> ExampleServer:
        server = ExampleServer(tmp_path / "baton", nats_server.url, SHOP_API_URL=services.base("shop"))
        started.append(server)
        server.start(timeout_s=BOUND_S)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


def order_created(event_id: str, order: dict[str, Any]) -> bytes:
    """A CloudEvents 1.0 structured-mode event, as a shop's order service emits it."""
    return orjson.dumps({"specversion": "1.0", "id": event_id, "source": "/shop/orders", "type": SUBJECT,
                         "datacontenttype": "application/json", "data": order})


def publish(nats_url: str, event: bytes) -> int:
    """Publish on JetStream; the stream sequence of the message."""
    async def go() -> int:
        nc = await nats.connect(nats_url)
        try:
            ack = await nc.jetstream().publish(SUBJECT, event, headers={"Content-Type": "application/cloudevents+json"})
            return ack.seq
        finally:
            await nc.close()
    return asyncio.run(go())


def acked_up_to(nats_url: str) -> int:
    """The stream sequence up to which Baton's trigger consumer has acknowledged."""
    async def go() -> int:
        nc = await nats.connect(nats_url)
        try:
            info = await nc.jetstream().consumer_info(EVENTS_STREAM, EVENTS_CONSUMER)
            return info.ack_floor.stream_seq
        finally:
            await nc.close()
    return asyncio.run(go())


def run_of(server: ExampleServer, order_id: str) -> dict[str, Any]:
    """The order's run once the event started it (its workflow_id is the order id)."""
    def found() -> dict[str, Any] | None:
        runs = server.ok("GET", f"/v1/runs?workflow=order-saga&workflow_id={order_id}")["runs"]
        return runs[0] if runs else None
    return server.wait_for(found, f"a run of order {order_id}", BOUND_S)


def finished(server: ExampleServer, order_id: str) -> dict[str, Any]:
    return server.wait_run(run_of(server, order_id)["run_id"], timeout_s=BOUND_S)


def history(server: ExampleServer, run_id: str) -> list[dict[str, Any]]:
    return server.ok("GET", f"/v1/runs/{run_id}/history")["events"]


def test_an_order_event_reserves_charges_and_ships_once(nats_server, shop: State, start_baton) -> None:
    server = start_baton()
    order = {"order_id": "o-1", "amount": 42.5, "items": ["widget", "gadget"]}
    publish(nats_server.url, order_created("evt-1", order))

    run = finished(server, "o-1")
    assert (run["status"], run["workflow_id"]) == ("succeeded", "o-1")
    steps = server.steps(run["run_id"])
    assert {key: s["status"] for key, s in steps.items()} == {"reserve": "succeeded", "charge": "succeeded",
                                                              "ship": "succeeded"}
    assert shop.ops("o-1") == ["reserve", "charge", "ship"]
    [charge] = shop.charges_of("o-1")
    assert (charge["amount"], charge["charge_id"]) == (42.5, steps["charge"]["output"]["charge_id"])
    [shipment] = shop.shipments_of("o-1")
    assert shipment["tracking"] == steps["ship"]["output"]["tracking"]
    assert shipment["reservation_id"] == steps["reserve"]["output"]["reservation_id"]
    assert (shop.stock["widget"], shop.stock["gadget"]) == (99, 99)

    # the order service publishes the same event again (its own retry): no second run, no second charge
    seq = publish(nats_server.url, order_created("evt-1", order))
    server.wait_for(lambda: acked_up_to(nats_server.url) >= seq, "Baton to handle the repeated event", BOUND_S)
    assert [r["run_id"] for r in server.runs("order-saga")] == [run["run_id"]]
    assert shop.ops("o-1") == ["reserve", "charge", "ship"]


def test_a_declined_card_releases_and_a_rejected_shipment_refunds_then_releases(
        nats_server, shop: State, start_baton) -> None:
    server = start_baton()
    shop.fail_shipping = True  # the carrier rejects every shipment
    publish(nats_server.url, order_created("evt-d", {"order_id": "o-declined", "amount": 10, "items": ["gizmo"],
                                                     "card": "tok_chargeDeclined"}))
    publish(nats_server.url, order_created("evt-s", {"order_id": "o-noship", "amount": 20, "items": ["gizmo"]}))

    declined = finished(server, "o-declined")
    assert declined["status"] == "compensated"
    steps = server.steps(declined["run_id"])
    assert (steps["charge"]["status"], steps["charge"]["error"]["type"], steps["charge"]["attempt"]) == \
        ("failed", "PaymentDeclined", 1)  # not retried: a declined card stays declined
    assert steps["reserve"]["compensation"]["status"] == "succeeded"
    assert steps["charge"]["compensation"] is None and "ship" not in steps  # never started
    assert shop.ops("o-declined") == ["reserve", "charge", "release"]
    assert shop.charges_of("o-declined") == [] and shop.refunds_of("o-declined") == []

    noship = finished(server, "o-noship")
    assert noship["status"] == "compensated"
    steps = server.steps(noship["run_id"])
    assert (steps["ship"]["status"], steps["ship"]["error"]["type"]) == ("failed", "Undeliverable")
    assert shop.ops("o-noship") == ["reserve", "charge", "ship", "refund", "release"]  # reverse order of completion
    [charge], [refund] = shop.charges_of("o-noship"), shop.refunds_of("o-noship")
    assert (refund["charge_id"], refund["amount"]) == (charge["charge_id"], 20)
    assert {s["compensation"]["status"] for key, s in steps.items() if key != "ship"} == {"succeeded"}

    assert shop.stock["gizmo"] == 3  # both reservations released
    assert {r["status"] for r in shop.reservations.values()} == {"released"}


def charge_succeeded(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["key"] == "charge" and e["type"] == "task.succeeded"]


def test_a_crash_between_charge_and_ship_charges_once(nats_server, shop: State, start_baton) -> None:
    server = start_baton()
    held = shop.hold("ship")  # the shipping service holds the first ship request: Baton waits on it
    publish(nats_server.url, order_created("evt-c", {"order_id": "o-crash", "amount": 30, "items": ["widget"]}))
    server.wait_for(held.arrived.is_set, "the ship request", BOUND_S)
    assert len(shop.charges_of("o-crash")) == 1
    server.kill()  # SIGKILL: charged, not shipped, the ship attempt in flight

    server = start_baton()  # same data dir, same NATS, same shop
    run = finished(server, "o-crash")
    assert run["status"] == "succeeded"
    assert len(shop.shipments_of("o-crash")) == 1
    [charge] = shop.charges_of("o-crash")
    assert shop.ops("o-crash") == ["reserve", "charge", "ship"]  # the held request never went through
    events = history(server, run["run_id"])
    assert [e["data"]["output"]["charge_id"] for e in charge_succeeded(events)] == [charge["charge_id"]]
    assert server.steps(run["run_id"])["charge"]["attempt"] == 1


def test_a_charge_whose_answer_was_lost_is_not_charged_again(nats_server, shop: State, start_baton) -> None:
    server = start_baton()
    held = shop.hold("charge", after=True)  # the service charges, then holds its answer
    publish(nats_server.url, order_created("evt-l", {"order_id": "o-lost", "amount": 55, "items": ["widget"]}))
    server.wait_for(held.arrived.is_set, "the charge request", BOUND_S)
    [first] = shop.charges_of("o-lost")
    server.kill()  # charged, but Baton never heard it: the charge step is still in flight

    server = start_baton()
    run = finished(server, "o-lost")
    assert run["status"] == "succeeded"
    # the step ran again with the same Idempotency-Key; the service replayed its first charge
    assert shop.ops("o-lost") == ["reserve", "charge", "charge", "ship"]
    charge_calls = [d for op, order, d in shop.calls if order == "o-lost" and op == "charge"]
    assert [(d["key"], d["replayed"]) for d in charge_calls] == [(first["idempotency_key"], False),
                                                                 (first["idempotency_key"], True)]
    assert shop.charges_of("o-lost") == [first]
    assert server.steps(run["run_id"])["charge"]["output"]["charge_id"] == first["charge_id"]
    assert [e["data"]["output"]["charge_id"] for e in charge_succeeded(history(server, run["run_id"]))] == \
        [first["charge_id"]]
    assert len(shop.shipments_of("o-lost")) == 1


def test_a_charge_answered_with_a_5xx_is_retried_with_the_same_key(nats_server, shop: State, start_baton) -> None:
    server = start_baton()
    held = shop.hold("charge", after=True)
    publish(nats_server.url, order_created("evt-5", {"order_id": "o-5xx", "amount": 7, "items": ["widget"]}))
    server.wait_for(held.arrived.is_set, "the charge request", BOUND_S)
    held.drop()  # the service charged, then answered 503 (a gateway gave up on it)

    run = finished(server, "o-5xx")
    assert run["status"] == "succeeded"
    assert server.steps(run["run_id"])["charge"]["attempt"] == 2  # retried, as a 5xx should be
    [charge] = shop.charges_of("o-5xx")  # attempt 2 sent attempt 1's key: no second charge
    assert [d["replayed"] for op, order, d in shop.calls if order == "o-5xx" and op == "charge"] == [False, True]
    assert server.steps(run["run_id"])["charge"]["output"]["charge_id"] == charge["charge_id"]


def test_baton_retry_after_a_decline_charges_with_a_new_key(nats_server, shop: State, start_baton) -> None:
    server = start_baton()
    shop.decline_cards.add("tok_visa")  # the card is declined today
    publish(nats_server.url, order_created("evt-r", {"order_id": "o-retry", "amount": 12, "items": ["widget"]}))
    run = finished(server, "o-retry")
    assert run["status"] == "compensated" and shop.charges_of("o-retry") == []

    shop.decline_cards.discard("tok_visa")  # the customer sorted it out with the bank
    server.cli("retry", run["run_id"])
    run = server.wait_run(run["run_id"], {"succeeded", "failed", "compensated"}, timeout_s=BOUND_S)
    assert run["status"] == "succeeded"
    # the declined attempt's key would replay the decline, as the payment service stores it: a new run attempt, a new key
    [charge] = shop.charges_of("o-retry")
    assert charge["idempotency_key"].endswith(":charge:run2")
    assert shop.ops("o-retry") == ["reserve", "charge", "release", "reserve", "charge", "ship"]
    assert len(shop.shipments_of("o-retry")) == 1 and shop.stock["widget"] == 99
