"""The standard OTLP/gRPC span exporter, able to send a request encoded already (otlp.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export import SpanExportResult


@dataclass(frozen=True, slots=True)
class _Encoded:
    body: bytes
    count: int


class GrpcSpanExporter(OTLPSpanExporter):
    def export_encoded(self, body: bytes, count: int) -> bool:
        # the exporter's own call, configured from OTEL_EXPORTER_OTLP_*: endpoint, headers,
        # compression, TLS, timeout, retries with back-off (it logs what fails)
        return self._export(_Encoded(body, count)) == SpanExportResult.SUCCESS

    def _translate_data(self, data: Any) -> ExportTraceServiceRequest:
        if isinstance(data, _Encoded):  # the stub takes a message: parsed in C, a fraction of encoding it
            return ExportTraceServiceRequest.FromString(data.body)
        return super()._translate_data(data)

    def _count_data(self, data: Any) -> int:
        return data.count if isinstance(data, _Encoded) else len(data)
