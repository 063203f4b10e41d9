"""`python -m handlers.examples.standins [--host H] [--port P]`: every stand-in service on one port."""

from __future__ import annotations

import argparse

from aiohttp import web

from handlers.examples.standins import SERVICES, mount


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"ok": True, "services": list(SERVICES)})


def main() -> None:
    parser = argparse.ArgumentParser(description="Stand-in services for the example workflows")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    root = web.Application()
    root.router.add_get("/healthz", healthz)
    for name in SERVICES:
        mount(root, name)
    print(f"stand-in services on http://{args.host}:{args.port}/ ({', '.join(f'/{n}/' for n in SERVICES)})", flush=True)
    web.run_app(root, host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
