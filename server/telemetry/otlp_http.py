"""The standard OTLP/HTTP span exporter, able to send a request encoded already (otlp.py).

It sends through the exporter's own client (`_client`, opentelemetry-exporter-otlp-proto-http
1.45 and later), which carries everything OTEL_EXPORTER_OTLP_* configures: endpoint, headers,
compression, TLS, timeout, retries with back-off. That attribute is not public API, so its
absence is reported when the exporter is made, not at the first export.
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

log = logging.getLogger("baton.tracing")


class HttpSpanExporter(OTLPSpanExporter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not callable(getattr(getattr(self, "_client", None), "export", None)):
            from importlib.metadata import version

            raise RuntimeError("opentelemetry-exporter-otlp-proto-http "
                               f"{version('opentelemetry-exporter-otlp-proto-http')} has no client to send "
                               "encoded spans with; Baton needs the 1.45 series (pyproject.toml)")

    def export_encoded(self, body: bytes, count: int) -> bool:
        if self._shutdown:
            return False
        limit = getattr(self, "_max_request_size", None)
        if limit and len(body) > limit:  # as the exporter's own export() does: dropped, said so
            log.warning("dropping a batch of %d spans: %d bytes exceed the exporter's max_request_size %d",
                        count, len(body), limit)
            return False
        return self._client.export(body).success
