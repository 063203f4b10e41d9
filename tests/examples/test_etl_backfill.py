"""etl-partitions: a 90-day backfill over a data lake on disk, 4 partitions at a time.

Three partitions hold bad data and must land in quarantine/ with the reason, without
being retried or failing the run; one partition is not complete when the run starts
(no `_SUCCESS`) and must be retried until it is, then loaded."""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from tests.examples.support import ExampleServer

START = date(2026, 8, 1)
DAYS = 90
MAX_CONCURRENCY = 4  # as config/workflows/etl-partitions.yaml says
DELAY_MS = 150  # each extract's read takes this long, so extracts really overlap
LATE = 5  # index of the partition whose _SUCCESS marker appears only after a failed extract
BAD = {  # index -> what is wrong with that partition
    11: "negative amount",
    37: "unreadable line",
    71: "outside the partition",
}


def _rows(day: date, n: int) -> list[dict[str, Any]]:
    return [{"order_id": f"{day:%Y%m%d}-{i:03d}", "ts": f"{day.isoformat()}T{i % 24:02d}:15:00Z",
             "amount_cents": 100 + 7 * i, "currency": "eur", "country": "de"} for i in range(n)]


def write_lake(root: Path) -> dict[str, int]:
    """90 daily partitions of 2 files each; returns the rows per partition."""
    counts = {}
    for index in range(DAYS):
        day = START + timedelta(days=index)
        rows = _rows(day, 10 + index % 7)
        lines = [json.dumps(r) for r in rows]
        problem = BAD.get(index)
        if problem == "negative amount":
            rows[3]["amount_cents"] = -500
            lines[3] = json.dumps(rows[3])
        elif problem == "unreadable line":
            lines[4] = lines[4][:25]  # a record cut off mid-write
        elif problem == "outside the partition":
            rows[2]["ts"] = f"{(day + timedelta(days=1)).isoformat()}T00:30:00Z"
            lines[2] = json.dumps(rows[2])
        part = root / "raw" / f"dt={day.isoformat()}"
        part.mkdir(parents=True)
        half = len(lines) // 2
        (part / "part-00000.jsonl").write_text("\n".join(lines[:half]) + "\n")
        (part / "part-00001.jsonl").write_text("\n".join(lines[half:]) + "\n")
        if index != LATE:
            (part / "_SUCCESS").touch()
        counts[day.isoformat()] = len(lines)
    return counts


def peak_overlap(intervals: list[tuple[int, int]]) -> int:
    """The largest number of intervals open at one instant (an end sorts before a start at the same instant)."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    peak = current = 0
    for _, change in edges:
        current += change
        peak = max(peak, current)
    return peak


def test_backfill_is_throttled_quarantines_bad_partitions_and_retries_a_late_one(tmp_path, nats_server):
    lake = tmp_path / "lake"
    rows_by_day = write_lake(lake)
    days = sorted(rows_by_day)
    late_day, bad_days = days[LATE], {days[i] for i in BAD}
    server = ExampleServer(tmp_path / "baton", nats_server.url, ETL_DATA_ROOT=str(lake))
    server.start()
    try:
        run_id = server.ok("POST", "/v1/workflows/etl-partitions/runs",
                           {"input": {"start": START.isoformat(), "days": DAYS, "delay_ms": DELAY_MS}},
                           expect=201)["run_id"]

        # the late partition's first extract fails (no _SUCCESS yet) and waits to be retried
        late_key = f"partitions[{LATE}]/extract"
        failed = server.wait_for(lambda: (s := server.steps(run_id).get(late_key)) and s["error"] and s,
                                 f"{late_key} to fail once", timeout_s=30)
        assert failed["error"]["type"] == "PartitionNotReady" and failed["error"]["retryable"], failed
        assert failed["status"] in ("retrying", "running"), failed
        (lake / "raw" / f"dt={late_day}" / "_SUCCESS").touch()  # upstream finishes writing it

        run = server.wait_run(run_id, timeout_s=90)
        assert run["status"] == "succeeded", (run["status"], run["error"])
        steps = {s["key"]: s for s in run["steps"]}

        # every partition was extracted by exactly one successful attempt; only the late one was retried
        extracts = {k: s for k, s in steps.items() if s["step_id"] == "extract"}
        assert sorted(s["output"]["partition"] for s in extracts.values()) == days
        assert all(s["status"] == "succeeded" for s in extracts.values())
        assert {s["output"]["partition"] for s in extracts.values() if s["attempt"] > 1} == {late_day}

        # the throttle: as seen by the handler, exactly max_concurrency extracts ran at once, never more
        intervals = [(s["output"]["entered_ns"], s["output"]["left_ns"]) for s in extracts.values()]
        assert peak_overlap(intervals) == MAX_CONCURRENCY
        assert max(s["output"]["in_flight_at_entry"] for s in extracts.values()) <= MAX_CONCURRENCY

        # the bad partitions were quarantined on the first attempt, never loaded; the others loaded, never quarantined
        for index in range(DAYS):
            day, prefix = days[index], f"partitions[{index}]/"
            validate, load, quarantine = (steps[prefix + s] for s in ("validate", "load", "quarantine"))
            assert validate["attempt"] == 1 and validate["status"] == "succeeded"
            if day in bad_days:
                assert validate["output"]["valid"] is False, day
                assert (quarantine["status"], quarantine["attempt"], load["status"]) == ("succeeded", 1, "skipped"), day
            else:
                assert validate["output"]["valid"] is True, (day, validate["output"]["problems"])
                assert (load["status"], load["attempt"], quarantine["status"]) == ("succeeded", 1, "skipped"), day

        # on disk: each partition in exactly one of clean/ and quarantine/, with its rows or its reason
        clean = {p.name.removeprefix("dt=") for p in (lake / "clean").iterdir()}
        quarantined = {p.name.removeprefix("dt=") for p in (lake / "quarantine").iterdir()}
        assert clean == set(days) - bad_days and quarantined == bad_days
        for day in clean:
            part = lake / "clean" / f"dt={day}"
            assert sorted(p.name for p in part.iterdir()) == ["_SUCCESS", "part-00000.jsonl"]
            loaded = [json.loads(line) for line in (part / "part-00000.jsonl").read_text().splitlines()]
            assert len(loaded) == rows_by_day[day] and all(r["currency"] == "EUR" and r["amount"] > 0 for r in loaded)
        for index, problem in BAD.items():
            part = lake / "quarantine" / f"dt={days[index]}"
            reason = json.loads((part / "_REASON.json").read_text())
            assert reason["run_id"] == run_id and reason["rows"] == rows_by_day[days[index]]
            assert any(problem in p or (problem == "unreadable line" and "line 5" in p) for p in reason["problems"]), reason
            assert sorted(p.name for p in part.iterdir()) == ["_REASON.json", "part-00000.jsonl", "part-00001.jsonl"]
        assert not (lake / "_staging" / run_id).exists()

        # the fan-in summary: the run's output and the file agree with the data written
        expected = {
            "partitions": DAYS,
            "loaded_partitions": DAYS - len(BAD),
            "loaded_rows": sum(n for d, n in rows_by_day.items() if d not in bad_days),
            "quarantined_partitions": len(BAD),
            "quarantined_rows": sum(rows_by_day[d] for d in bad_days),
            "quarantined": sorted(bad_days),
            "first": days[0],
            "last": days[-1],
        }
        assert {k: run["output"][k] for k in expected} == expected
        summary = json.loads((lake / "_summaries" / f"{run_id}.json").read_text())
        assert {k: summary[k] for k in expected} == expected and summary["run_id"] == run_id
    finally:
        server.stop()


def test_rerun_replaces_a_partition_and_loads_a_fixed_one(tmp_path, nats_server):
    lake = tmp_path / "lake"
    for index, n in enumerate((5, 6, 7)):
        day = START + timedelta(days=index)
        part = lake / "raw" / f"dt={day.isoformat()}"
        part.mkdir(parents=True)
        rows = _rows(day, n)
        if index == 1:
            rows[0]["amount_cents"] = -1
        (part / "part-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (part / "_SUCCESS").touch()
    days = [(START + timedelta(days=i)).isoformat() for i in range(3)]
    server = ExampleServer(tmp_path / "baton", nats_server.url)
    server.start()
    try:
        # as a user types it, with the lake's root in the input
        first = server.run(json.loads(server.cli("start", "etl-partitions", "--input",
                                      json.dumps({"start": days[0], "days": 3, "root": str(lake)}),
                                      "--wait", "--json").stdout)["run_id"])
        assert first["status"] == "succeeded", first
        assert first["output"]["quarantined"] == [days[1]] and first["output"]["loaded_rows"] == 12

        # upstream redelivers the bad day fixed; a re-run of two days replaces their output
        fixed = lake / "raw" / f"dt={days[1]}" / "part-00000.jsonl"
        fixed.write_text("".join(json.dumps(r) + "\n" for r in _rows(START + timedelta(days=1), 6)))
        second = server.run(json.loads(server.cli("start", "etl-partitions", "--input",
                                       json.dumps({"partitions": days[:2], "root": str(lake)}),
                                       "--wait", "--json").stdout)["run_id"])
        assert second["status"] == "succeeded", second
        assert (second["output"]["loaded_partitions"], second["output"]["quarantined"]) == (2, [])
        assert not (lake / "quarantine" / f"dt={days[1]}").exists()
        for day, n in zip(days, (5, 6, 7)):
            part = lake / "clean" / f"dt={day}"
            assert sorted(p.name for p in part.iterdir()) == ["_SUCCESS", "part-00000.jsonl"]
            assert len((part / "part-00000.jsonl").read_text().splitlines()) == n  # replaced, not appended

        # a request that cannot be planned fails at once, naming the problem, without retries
        bad = server.ok("POST", "/v1/workflows/etl-partitions/runs",
                        {"input": {"start": "2026-02-30", "days": 3, "root": str(lake)}}, expect=201)
        run = server.wait_run(bad["run_id"])
        assert run["status"] == "failed" and run["error"]["type"] == "BadInput", run
        assert "start: '2026-02-30' is not a date" in run["error"]["message"]
        assert server.steps(bad["run_id"])["plan"]["attempt"] == 1
    finally:
        server.stop()
