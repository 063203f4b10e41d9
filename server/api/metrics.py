"""GET /metrics: the runtime's Prometheus metrics (server/telemetry/metrics.py).

Open, like the probes: Prometheus scrapers rarely carry tokens, and the server binds
to loopback unless told otherwise. The Prometheus text format (0.0.4), or OpenMetrics
when the scraper's Accept header asks for it, as prometheus-client negotiates.
"""

from __future__ import annotations

from aiohttp import web

from server.api.routes import ORCH
from server.api.table import Route

TEXT = "text/plain"
OPENMETRICS = "application/openmetrics-text"


async def metrics(request: web.Request) -> web.Response:
    metrics = request.app[ORCH].metrics
    await metrics.refresh()  # stored timers and the event consumer's lag, read for this scrape
    body, content_type = metrics.exposition(request.headers.get("Accept"))
    return web.Response(body=body, headers={"Content-Type": content_type})


ROUTES: list[Route] = [
    Route("GET", "/metrics", metrics, None,
          "Prometheus metrics: runs, steps, waits, queues, timers, the store, the event consumer", "probes",
          responses={200: (TEXT, OPENMETRICS)}),
]
