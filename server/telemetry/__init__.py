"""Telemetry: OpenTelemetry traces of runs, Prometheus metrics, structured logs."""
