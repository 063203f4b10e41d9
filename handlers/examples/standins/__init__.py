"""Stand-ins for the services the example workflows' handlers call over HTTP: a shop's
inventory, payments and shipping, a CI and deploy API with health and metrics, an alert
enrichment service and chat channels. They keep their state in memory and behave as the
real services do where the examples depend on it (a payment with a known idempotency
key is not charged twice), so the examples can be tried on a laptop:

    python -m handlers.examples.standins          # http://127.0.0.1:8090/<service>/...

Each module here is one service: `State` (what it holds, and switches the example
tests use to make it fail) and `make_app(state)`, an aiohttp application that
`__main__` mounts under `/<PREFIX>/`. The example tests serve the same applications
on a free loopback port. Nothing in the server imports this package.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8090"
SERVICES = ("shop", "deploy", "incidents")  # handlers/examples/standins/<name>.py, mounted at /<name>/


def service(name: str) -> ModuleType:
    return importlib.import_module(f"{__name__}.{name}")


def mount(root: web.Application, name: str, state: object | None = None) -> object:
    """Mount service `name` under `/<name>/` with `state` (a fresh one by default); returns the state."""
    module = service(name)
    state = module.State() if state is None else state
    root.add_subapp(f"/{name}/", module.make_app(state))
    return state


def first_answer(lock: threading.Lock | threading.RLock, answers: dict[str, Any], key: str | None,
                 make: Callable[[], T]) -> tuple[T, bool]:
    """An Idempotency-Key as payment APIs honour it: the answer the first request with
    `key` got (`make()` runs once per key, under `lock`), and whether this request
    repeats it. Without a key every request is new."""
    with lock:
        if key and key in answers:
            return answers[key], True
        answer = make()
        if key:
            answers[key] = answer
        return answer, False
