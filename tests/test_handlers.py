"""The handler SDK: registry rules, loading, argument mapping, built-ins, and
`http.request` against a real aiohttp server on 127.0.0.1."""

from __future__ import annotations

import ast
import asyncio
import logging
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import handlers
from handlers import REGISTRY, Context, NonRetryableError, Registry, handler, invoke, load_modules
from handlers.builtins import HandlerFailed
from handlers.context import error_type_name, idempotency_key
from handlers.http import HttpError, header_injectors


def make_ctx(attempt: int = 1, step_id: str = "s1") -> Context:
    return Context(
        workflow="wf",
        version="1",
        workflow_id=None,
        run_id="r1",
        step_id=step_id,
        task_id="t1",
        attempt=attempt,
        idempotency_key=idempotency_key("r1", step_id, attempt),
    )


async def run(name: str, input: Any = None, attempt: int = 1) -> Any:
    return await invoke(REGISTRY.get(name), make_ctx(attempt), input, name=name)


async def h_ok(ctx: Context, a: int, b: int = 2) -> int:
    return a + b


@pytest.fixture(autouse=True)
async def close_shared_session() -> AsyncIterator[None]:
    # http.request opens a session per event loop; each test has its own loop.
    yield
    await REGISTRY.aclose()


# --- context -------------------------------------------------------------------


def test_context_key_and_logger_extra() -> None:
    ctx = make_ctx(attempt=3)
    assert ctx.idempotency_key == "r1:s1:3"
    assert ctx.logger is ctx.logger  # built once, on first use
    assert ctx.logger.logger.name == "baton.handler"
    assert ctx.logger.extra == {"workflow": "wf", "run_id": "r1", "step_id": "s1", "task_id": "t1", "attempt": 3}
    assert ctx == make_ctx(attempt=3)  # the cached logger takes no part in equality


def test_context_log_record_carries_ids(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="baton.handler"):
        make_ctx().logger.info("hello")
    assert caplog.records[0].run_id == "r1"  # type: ignore[attr-defined]


def test_error_type_name() -> None:
    assert error_type_name(NonRetryableError("x", type="PaymentDeclined")) == "PaymentDeclined"
    assert error_type_name(NonRetryableError("x")) == "NonRetryableError"
    assert error_type_name(ValueError("x")) == "ValueError"


# --- registry ------------------------------------------------------------------


def test_register_and_get() -> None:
    reg = Registry()
    reg.register("math.add", h_ok)
    assert reg.get("math.add") is h_ok
    assert "math.add" in reg and "other" not in reg
    assert reg.names() == ["math.add"]


def test_reregistering_the_same_function_is_fine() -> None:
    reg = Registry()
    reg.register("add", h_ok)
    reg.register("add", h_ok)
    assert reg.names() == ["add"]


def test_a_different_function_under_a_taken_name_is_an_error() -> None:
    async def other(ctx: Context) -> None: ...

    reg = Registry()
    reg.register("add", h_ok)
    with pytest.raises(ValueError, match="'add' is already registered"):
        reg.register("add", other)


def test_a_sync_function_is_rejected_by_name() -> None:
    def sync(ctx: Context) -> None: ...

    with pytest.raises(TypeError, match="handler 'sync.one' must be an 'async def'"):
        Registry().register("sync.one", sync)


def test_a_handler_without_ctx_is_rejected() -> None:
    async def kw_only(**input: Any) -> None: ...

    with pytest.raises(TypeError, match="'kw' must take ctx"):
        Registry().register("kw", kw_only)


@pytest.mark.parametrize("name", ["", ".lead", "-lead", "has space", "slash/name", "ünï"])
def test_bad_names_are_rejected(name: str) -> None:
    with pytest.raises(ValueError, match="invalid handler name"):
        Registry().register(name, h_ok)


@pytest.mark.parametrize("name", ["a", "_x", "9lives", "orders.reserve", "http-get", "A.b_c-1"])
def test_good_names_are_accepted(name: str) -> None:
    assert Registry().register(name, h_ok) is h_ok


def test_get_suggests_close_names() -> None:
    reg = Registry()
    reg.register("orders.reserve", h_ok)
    reg.register("orders.release", h_ok)
    with pytest.raises(KeyError, match="did you mean 'orders.reserve'"):
        reg.get("orders.reserv")
    with pytest.raises(KeyError) as info:
        reg.get("zzz")
    assert "did you mean" not in str(info.value)


def test_decorator_registers_and_returns_the_function() -> None:
    reg = Registry()

    @handler("deco.one", registry=reg)
    async def one(ctx: Context) -> int:
        return 1

    assert reg.get("deco.one") is one


async def test_aclose_runs_every_hook_in_reverse_and_groups_failures() -> None:
    reg = Registry()
    calls: list[str] = []

    @reg.on_shutdown
    async def first() -> None:
        calls.append("first")

    @reg.on_shutdown
    async def broken() -> None:
        calls.append("broken")
        raise RuntimeError("boom")

    with pytest.raises(ExceptionGroup) as info:
        await reg.aclose()
    assert calls == ["broken", "first"]
    assert [str(e) for e in info.value.exceptions] == ["boom"]


# --- load_modules --------------------------------------------------------------


def test_load_modules_registers_the_examples() -> None:
    load_modules(["handlers.examples.orders", "handlers.examples.deploy"])
    for name in ["orders.reserve", "orders.release", "orders.charge", "orders.refund", "orders.ship"]:
        assert name in REGISTRY
    for name in ["deploy.check_build", "deploy.apply", "deploy.rollback", "deploy.shift_traffic", "deploy.verify"]:
        assert name in REGISTRY


def test_load_modules_returns_the_names_it_added(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "user_handlers_ok.py").write_text(
        "from handlers import handler\n"
        "@handler('user.hello')\n"
        "async def hello(ctx):\n"
        "    return 'hi'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "user_handlers_ok", raising=False)  # import afresh on a rerun
    assert load_modules(["user_handlers_ok"]) == ["user.hello"]
    assert load_modules(["user_handlers_ok"]) == []  # already imported


def test_load_modules_names_a_missing_module() -> None:
    with pytest.raises(ImportError, match="'handlers.examples.nope'.*ModuleNotFoundError"):
        load_modules(["handlers.examples.nope"])


def test_load_modules_names_the_cause_of_a_broken_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "user_handlers_broken.py").write_text("raise RuntimeError('no config')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError, match="'user_handlers_broken': RuntimeError: no config"):
        load_modules(["user_handlers_broken"])


def test_handlers_does_not_import_server() -> None:
    # The SDK is imported by the server, never the reverse.
    for path in Path(handlers.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = [node.module or ""]
            else:
                continue
            assert not any(m == "server" or m.startswith("server.") for m in modules), path


# --- invoke --------------------------------------------------------------------


async def test_invoke_maps_input_to_arguments() -> None:
    async def none_arg(ctx: Context) -> str:
        return "none"

    async def value_arg(ctx: Context, input: Any) -> Any:
        return input

    ctx = make_ctx()
    assert await invoke(h_ok, ctx, {"a": 1}) == 3
    assert await invoke(none_arg, ctx, None) == "none"
    assert await invoke(value_arg, ctx, [1, 2]) == [1, 2]
    assert await invoke(value_arg, ctx, "text") == "text"


@pytest.mark.parametrize(
    ("input", "reason"),
    [
        ({"b": 1}, "missing a required argument: 'a'"),
        ({"a": 1, "c": 2}, "unexpected keyword argument 'c'"),
        (None, "missing a required argument: 'a'"),
        ({1: 2}, "keywords must be strings"),
    ],
)
async def test_invoke_reports_a_mismatched_input_as_non_retryable(input: Any, reason: str) -> None:
    with pytest.raises(NonRetryableError, match=f"'math.add'.*{reason}") as info:
        await invoke(h_ok, make_ctx(), input, name="math.add")
    assert info.value.type == "InvalidInput"
    assert info.value.details == {"handler": "math.add", "reason": info.value.details["reason"]}


async def test_invoke_names_input_when_a_plain_value_is_not_accepted() -> None:
    with pytest.raises(NonRetryableError, match="unexpected keyword argument 'input'"):
        await invoke(REGISTRY.get("noop"), make_ctx(), 5, name="noop")


async def test_invoke_lets_a_type_error_inside_the_handler_through() -> None:
    async def buggy(ctx: Context) -> None:
        raise TypeError("bug inside")

    with pytest.raises(TypeError, match="bug inside"):
        await invoke(buggy, make_ctx(), None)


# --- built-ins -----------------------------------------------------------------


def test_builtins_are_registered_on_import() -> None:
    for name in ["noop", "echo", "fail", "sleep", "http.request"]:
        assert name in REGISTRY


async def test_noop_echo_sleep() -> None:
    assert await run("noop") is None
    assert await run("echo", {"x": 1, "y": [2]}) == {"x": 1, "y": [2]}
    assert await run("sleep", {"seconds": 0}) == {"slept": 0}


async def test_fail_always_fails_retryably_by_default() -> None:
    with pytest.raises(HandlerFailed, match="failed on purpose"):
        await run("fail", attempt=7)


async def test_fail_succeeds_after_times_attempts() -> None:
    with pytest.raises(HandlerFailed):
        await run("fail", {"times": 2}, attempt=2)
    assert await run("fail", {"times": 2}, attempt=3) == {"attempt": 3}


async def test_fail_non_retryable_with_a_type() -> None:
    with pytest.raises(NonRetryableError, match="nope") as info:
        await run("fail", {"message": "nope", "retryable": False, "error_type": "Declined"})
    assert error_type_name(info.value) == "Declined"


async def test_fail_retryable_reports_the_requested_type() -> None:
    with pytest.raises(HandlerFailed) as info:
        await run("fail", {"error_type": "Flaky"})
    assert error_type_name(info.value) == "Flaky"


async def test_examples_are_stable_across_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    from handlers.examples.standins import shop

    load_modules(["handlers.examples.orders"])
    state = shop.State()
    async with TestServer(shop.make_app(state), host="127.0.0.1") as server:
        monkeypatch.setenv("SHOP_API_URL", str(server.make_url("")))
        first = await run("orders.reserve", {"order_id": "o1", "items": ["widget"]}, attempt=1)
        second = await run("orders.reserve", {"order_id": "o1", "items": ["widget"]}, attempt=2)
        assert first["reservation_id"] == second["reservation_id"]
        charged = [await run("orders.charge", {"order_id": "o1", "amount": 5}, attempt=n) for n in (1, 2)]
        assert charged[0]["charge_id"] == charged[1]["charge_id"] and len(state.charges) == 1
        with pytest.raises(NonRetryableError, match="does not ship order o1 to AQ"):
            await invoke(REGISTRY.get("orders.ship"), make_ctx(step_id="ship"),
                         {"order_id": "o1", "reservation_id": first["reservation_id"], "country": "AQ"}, name="ship")
    assert state.stock["widget"] == 99


# --- http.request against a real server ----------------------------------------


class Upstream:
    """A real aiohttp server on 127.0.0.1 with the routes the tests need."""

    def __init__(self) -> None:
        self.release = asyncio.Event()  # holds /hang until teardown
        self.seen_headers: dict[str, str] = {}
        app = web.Application()
        app.router.add_route("*", "/json", self.json)
        app.router.add_get("/text", self.text)
        app.router.add_get("/status/{code}", self.status)
        app.router.add_get("/hang", self.hang)
        self.server = TestServer(app, host="127.0.0.1")

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    async def json(self, request: web.Request) -> web.Response:
        self.seen_headers = dict(request.headers)
        sent = await request.json() if request.can_read_body else None
        return web.json_response({"method": request.method, "query": dict(request.query), "sent": sent})

    async def text(self, request: web.Request) -> web.Response:
        return web.Response(text="plain words", headers={"X-Reply": "yes"})

    async def status(self, request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="upstream says no")

    async def hang(self, request: web.Request) -> web.Response:
        await self.release.wait()
        return web.Response(text="late")


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    await server.server.start_server()
    yield server
    server.release.set()
    await server.server.close()


async def test_http_json_body_is_parsed(upstream: Upstream) -> None:
    out = await run(
        "http.request",
        {"url": upstream.url("/json"), "method": "POST", "params": {"q": "1"}, "json": {"a": 1}},
    )
    assert out["status"] == 200
    assert out["headers"]["content-type"].startswith("application/json")
    assert out["body"] == {"method": "POST", "query": {"q": "1"}, "sent": {"a": 1}}


async def test_http_text_body(upstream: Upstream) -> None:
    out = await run("http.request", {"url": upstream.url("/text")})
    assert out["body"] == "plain words"
    assert out["headers"]["x-reply"] == "yes"


async def test_http_404_is_not_retryable(upstream: Upstream) -> None:
    with pytest.raises(NonRetryableError, match="HTTP 404: upstream says no") as info:
        await run("http.request", {"url": upstream.url("/status/404")})
    assert info.value.type == "HttpError"
    assert info.value.details == {"status": 404, "body": "upstream says no"}


@pytest.mark.parametrize("code", [503, 429])
async def test_http_5xx_and_429_are_retryable(upstream: Upstream, code: int) -> None:
    with pytest.raises(HttpError) as info:
        await run("http.request", {"url": upstream.url(f"/status/{code}")})
    assert info.value.status == code


async def test_http_expect_widens_success(upstream: Upstream) -> None:
    out = await run("http.request", {"url": upstream.url("/status/404"), "expect": [404]})
    assert out["status"] == 404


async def test_http_connection_refused_is_retryable() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago and nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(HttpError) as info:
        await run("http.request", {"url": f"http://127.0.0.1:{port}/"})
    assert info.value.status is None


async def test_http_timeout_is_retryable(upstream: Upstream) -> None:
    with pytest.raises(HttpError, match="no response within 0.2s"):
        await run("http.request", {"url": upstream.url("/hang"), "timeout_s": 0.2})


async def test_http_invalid_url_is_not_retryable() -> None:
    with pytest.raises(NonRetryableError, match="invalid URL"):
        await run("http.request", {"url": "ftp://example.invalid/file"})


async def test_http_header_injectors_add_headers(upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    def inject(ctx: Context, headers: dict[str, str]) -> None:
        headers["traceparent"] = f"00-{ctx.run_id}"

    monkeypatch.setattr("handlers.http.header_injectors", [*header_injectors, inject])
    await run("http.request", {"url": upstream.url("/json"), "headers": {"X-Own": "1"}})
    assert upstream.seen_headers["traceparent"] == "00-r1"
    assert upstream.seen_headers["X-Own"] == "1"
