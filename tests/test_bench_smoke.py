"""The benchmarks run end to end against a real server and print their figures.

Only that they work is checked: exit 0, a JSON last line with every figure, no
failed run. No figure is asserted; speed is measured with `python -m bench`, never
in tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_TIMEOUT_S = 100  # start-up, warm-up and a few hundred runs take seconds; this only catches a hang

EXPECTED_KEYS = {
    "workload", "runs", "concurrency", "sync", "succeeded", "failures", "stalled_waits", "wall_s",
    "runs_per_s", "p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms",
    "server_rss_mib", "server_rss_peak_mib", "server_cpu_s", "client_cpu_s",
}


def run_bench(*args: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *args], cwd=REPO_ROOT, capture_output=True, text=True,
        timeout=BENCH_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    last_line = proc.stdout.strip().splitlines()[-1]
    return json.loads(last_line)


@pytest.mark.integration
@pytest.mark.timeout(BENCH_TIMEOUT_S + 20)
def test_chain3_quick_reports_every_figure():
    figures = run_bench("chain3", "--quick")
    assert EXPECTED_KEYS <= figures.keys()
    assert figures["workload"] == "chain3"
    assert figures["runs"] == 200
    assert figures["failures"] == 0


@pytest.mark.integration
@pytest.mark.timeout(BENCH_TIMEOUT_S + 20)
def test_latency_reports_every_figure():
    figures = run_bench("latency", "--runs", "20")
    assert EXPECTED_KEYS <= figures.keys()
    assert figures["workload"] == "latency"
    assert figures["runs"] == 20
    assert figures["concurrency"] == 1
    assert figures["failures"] == 0


EVENTS_EXPECTED_KEYS = {
    "workload", "events", "window", "sync", "warmup", "succeeded", "failures", "failure_kinds",
    "publish_s", "publish_per_s", "committed_s", "events_per_s", "wall_s", "end_to_end_per_s",
    "p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms", "e2e_p50_ms", "e2e_p99_ms",
    "server_rss_mib", "server_rss_peak_mib", "server_cpu_s", "nats_cpu_s", "client_cpu_s",
}


@pytest.mark.integration
@pytest.mark.timeout(BENCH_TIMEOUT_S + 20)
def test_events_quick_reports_every_figure():
    figures = run_bench("events", "--quick")
    assert EVENTS_EXPECTED_KEYS <= figures.keys()
    assert figures["workload"] == "events"
    assert figures["events"] == 300
    assert figures["succeeded"] == 300
    assert figures["failures"] == 0


TIMERS_EXPECTED_KEYS = {
    "workload", "count", "max_sleep_s", "lead_s", "succeeded", "failures", "failure_kinds", "start_s",
    "starts_per_s", "peak_pending_timers", "started_late", "lateness_p50_ms", "lateness_p99_ms",
    "lateness_max_ms", "done_lateness_p50_ms", "done_lateness_p99_ms", "done_lateness_max_ms",
    "server_rss_pending_mib", "server_rss_peak_mib", "server_cpu_s", "wall_s",
}


@pytest.mark.integration
@pytest.mark.timeout(BENCH_TIMEOUT_S + 20)
def test_timers_quick_reports_every_figure():
    figures = run_bench("timers", "--quick")
    assert TIMERS_EXPECTED_KEYS <= figures.keys()
    assert figures["workload"] == "timers"
    assert figures["count"] == 300
    assert figures["succeeded"] == 300
    assert figures["failures"] == 0
    assert all(figures[key] is not None for key in TIMERS_EXPECTED_KEYS)


PARK_EXPECTED_KEYS = {
    "workload", "runs", "wait", "signal_via", "signal_rate", "succeeded", "failures", "failure_kinds",
    "start_s", "starts_per_s", "server_rss_parked_mib", "server_rss_parked_peak_mib", "restart", "stop_s",
    "restart_ready_s", "server_rss_restarted_mib", "signal_s", "signals_per_s", "p50_ms", "p90_ms", "p99_ms",
    "max_ms", "recorded_p99_ms", "server_rss_end_mib", "server_rss_peak_mib", "server_cpu_s", "client_cpu_s",
}


@pytest.mark.integration
@pytest.mark.timeout(BENCH_TIMEOUT_S + 20)
def test_park_quick_reports_every_figure():
    figures = run_bench("park", "--quick")
    assert PARK_EXPECTED_KEYS <= figures.keys()
    assert figures["workload"] == "park"
    assert figures["runs"] == 300
    assert figures["restart"] == "sigterm"
    assert figures["succeeded"] == 300
    assert figures["failures"] == 0
    assert all(figures[key] is not None for key in PARK_EXPECTED_KEYS)


FANOUT_EXPECTED_KEYS = {
    "workload", "items", "max_concurrency", "status", "failures", "failure_kinds", "peak_concurrency",
    "items_at_peak", "wall_s", "items_per_s", "server_items_per_s", "detail_bytes", "detail_s",
    "server_rss_mib", "server_rss_peak_mib", "server_cpu_s", "server_cpu_ms_per_item",
}


@pytest.mark.integration
@pytest.mark.timeout(BENCH_TIMEOUT_S + 20)
def test_fanout_quick_reports_every_figure():
    figures = run_bench("fanout", "--quick")
    assert FANOUT_EXPECTED_KEYS <= figures.keys()
    assert figures["workload"] == "fanout"
    assert figures["items"] == 500
    assert figures["status"] == "succeeded"
    assert figures["failures"] == 0
    assert all(figures[key] is not None for key in FANOUT_EXPECTED_KEYS)
    assert 1 <= figures["peak_concurrency"] <= figures["max_concurrency"]  # the limit held


SOAK_EXPECTED_KEYS = {
    "workload", "runs", "chunk", "succeeded", "failures", "failure_kinds", "wall_s", "runs_per_s",
    "server_rss_warm_mib", "server_rss_min_mib", "server_rss_max_mib", "server_rss_last_mib", "rss_drift_pct",
    "rss_max_drift_pct", "server_rss_peak_mib", "server_cpu_ms_per_run", "db_mib", "samples",
}


@pytest.mark.integration
@pytest.mark.timeout(BENCH_TIMEOUT_S + 20)
def test_soak_quick_reports_every_figure():
    figures = run_bench("soak", "--quick")
    assert SOAK_EXPECTED_KEYS <= figures.keys()
    assert figures["workload"] == "soak"
    assert figures["runs"] == 3000
    assert figures["succeeded"] == 3000
    assert figures["failures"] == 0
    assert [s["runs"] for s in figures["samples"]] == list(range(500, 3001, 500))
