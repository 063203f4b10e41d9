"""`python -m tests.examples.clockserver`: `baton serve` with a clock the test moves.

Everything is the real server, configured from the environment as `baton serve` is
(auth as the settings say), except its clock: a `ManualClock` that starts at
TEST_CLOCK_START (unix seconds) and moves only when the test says so, on a second
loopback port, TEST_CLOCK_PORT:

    GET  /clock                   {"now": t, "sleepers": [deadline, ...]}
    POST /clock {"set": t}        the same answer, once the clock reads t

Schedules, durable timers and approval timeouts then fire when the test moves the
clock past them, and not before: a 19:00 cron trigger or a 15-minute escalation is
tested in a second, without waiting for it or faking the system time.
"""

from __future__ import annotations

import asyncio
import os

from aiohttp import web

from server.app import configure_logging, serve
from server.runtime.clock import ManualClock
from server.settings import load_settings


def control_app(clock: ManualClock) -> web.Application:
    def state() -> web.Response:
        return web.json_response({"now": clock.now(), "sleepers": clock.sleepers})

    async def read(_: web.Request) -> web.Response:
        return state()

    async def move(request: web.Request) -> web.Response:
        body = await request.json()
        try:
            clock.set(float(body["set"]))
        except (KeyError, TypeError, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return state()

    app = web.Application()
    app.router.add_get("/clock", read)
    app.router.add_post("/clock", move)
    return app


async def main() -> None:
    settings = load_settings()
    configure_logging(settings)
    clock = ManualClock(float(os.environ["TEST_CLOCK_START"]), jitter=0.0)
    runner = web.AppRunner(control_app(clock), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(os.environ["TEST_CLOCK_PORT"])).start()
    try:
        await serve(settings, clock=clock)
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
