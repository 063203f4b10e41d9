"""ETL over the daily partitions of a data lake (workflow etl-partitions).

The lake is a directory tree on local disk, a stand-in for an object store:

    raw/dt=YYYY-MM-DD/*.jsonl + _SUCCESS     what upstream delivers; `_SUCCESS` marks a
                                             complete partition (as Hadoop and Spark write it)
    clean/dt=YYYY-MM-DD/part-00000.jsonl     rows that passed validation, + `_SUCCESS`
    quarantine/dt=YYYY-MM-DD/                copies of the raw files of a partition that
                                             failed validation, + `_REASON.json`
    _staging/<run_id>/dt=YYYY-MM-DD/         work files passed between the steps of a run
    _summaries/<run_id>.json                 what a run loaded and quarantined

Steps pass paths and counts, never the rows: a step's output is stored in the run's
history, and a partition can be far larger than an output should be.

Every write goes to a temporary name first and is renamed into place, so a retried or
re-run step replaces its output instead of adding to it, and a reader never sees half
a file. File I/O runs in a thread (`asyncio.to_thread`) to keep the server's loop free.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
import uuid
from collections import Counter
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from handlers.context import Context, NonRetryableError
from handlers.registry import handler

DEFAULT_ROOT = "lake"  # relative to the server's working directory, unless ETL_DATA_ROOT says otherwise
MAX_BACKFILL_DAYS = 366 * 3
MAX_PROBLEMS_REPORTED = 20  # per partition, in outputs and _REASON.json: enough to act on, small enough to store
REQUIRED_FIELDS = ("order_id", "ts", "amount_cents", "currency", "country")

# Extracts in flight in this process, per run: each extract reports the count it saw on
# entry (itself included), so a run's outputs show how many ran side by side.
_IN_FLIGHT: Counter[str] = Counter()


class PartitionNotReady(Exception):
    """The partition is missing or upstream has not finished writing it (no `_SUCCESS`
    yet). Retried: the data usually arrives a little later."""


def _partition_dir(root: Path, zone: str, partition: str) -> Path:
    return root / zone / f"dt={partition}"


def _day(value: str, field: str) -> date:
    try:
        return date.fromisoformat(value)
    except (TypeError, ValueError):
        raise NonRetryableError(f"{field}: {value!r} is not a date (YYYY-MM-DD)", type="BadInput") from None


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _publish_dir(build: Path, target: Path) -> None:
    """Put the fully written directory `build` at `target`, replacing what was there.
    A directory cannot be renamed over a non-empty one, so the old one is moved aside
    first: readers see the old partition, then (for an instant) none, then the new one."""
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
    if target.exists():
        os.replace(target, old)
    os.replace(build, target)
    shutil.rmtree(old, ignore_errors=True)


def _build_dir(root: Path, zone: str, partition: str) -> Path:
    build = root / zone / f".dt={partition}.tmp-{uuid.uuid4().hex}"
    build.mkdir(parents=True)
    return build


# ----------------------------------------------------------------------------- plan

@handler("etl.plan")
async def plan(
    ctx: Context,
    partitions: list[str] | None = None,
    start: str | None = None,
    end: str | None = None,
    days: int | None = None,
    root: str | None = None,
) -> dict[str, Any]:
    """The partitions to process: `partitions` as listed, or `days` days from `start`
    (a backfill), or the `days` days before `end` (the daily trigger: `end` = today)."""
    base = Path(root or os.environ.get("ETL_DATA_ROOT") or DEFAULT_ROOT).resolve()
    if not (base / "raw").is_dir():
        raise NonRetryableError(f"no raw zone under {base}: pass `root` or set ETL_DATA_ROOT", type="BadInput")
    if partitions is not None:
        days_list = [_day(p, "partitions[]") for p in partitions]
    else:
        if days is None or (start is None) == (end is None):
            raise NonRetryableError("give `partitions`, or `days` with one of `start` or `end`", type="BadInput")
        if not 1 <= days <= MAX_BACKFILL_DAYS:
            raise NonRetryableError(f"days: {days} is not between 1 and {MAX_BACKFILL_DAYS}", type="BadInput")
        first = _day(start, "start") if start is not None else _day(end, "end") - timedelta(days=days)
        days_list = [first + timedelta(days=i) for i in range(days)]
    ordered = sorted(set(days_list))
    ctx.logger.info("planned %d partitions under %s", len(ordered), base)
    return {"root": str(base), "partitions": [d.isoformat() for d in ordered]}


# ----------------------------------------------------------------------------- extract

def _extract(root: Path, partition: str, staged: Path) -> dict[str, Any]:
    source = _partition_dir(root, "raw", partition)
    if not (source / "_SUCCESS").exists():
        raise PartitionNotReady(f"{source} has no _SUCCESS marker yet")
    files = sorted(source.glob("*.jsonl"))
    lines = 0
    chunks = []
    for f in files:
        text = f.read_text()
        lines += text.count("\n")
        chunks.append(text if text.endswith("\n") or not text else text + "\n")
    _write_atomically(staged / "extracted.jsonl", "".join(chunks))
    return {"files": [f.name for f in files], "lines": lines}


@handler("etl.extract")
async def extract(ctx: Context, root: str, partition: str, delay_ms: int = 0) -> dict[str, Any]:
    """Copy a complete raw partition into the run's staging area. `delay_ms` stands in
    for the latency of reading from a remote store. The output carries the attempt's
    start and end (`time.monotonic_ns()`, one clock for the whole host) and how many
    extracts of this run were in flight when it started, so the throttle can be seen."""
    _IN_FLIGHT[ctx.run_id] += 1
    entered_ns = time.monotonic_ns()
    in_flight_at_entry = _IN_FLIGHT[ctx.run_id]
    try:
        staged = Path(root) / "_staging" / ctx.run_id / f"dt={partition}"
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        found = await asyncio.to_thread(_extract, Path(root), partition, staged)
        left_ns = time.monotonic_ns()
    finally:
        _IN_FLIGHT[ctx.run_id] -= 1
        if not _IN_FLIGHT[ctx.run_id]:
            del _IN_FLIGHT[ctx.run_id]
    return {"partition": partition, "staged": str(staged), **found,
            "entered_ns": entered_ns, "left_ns": left_ns, "in_flight_at_entry": in_flight_at_entry}


# ----------------------------------------------------------------------------- transform

def _normalise(record: dict[str, Any]) -> dict[str, Any]:
    """One raw record in the clean shape; raises KeyError/ValueError/TypeError if it cannot be read."""
    ts = datetime.fromisoformat(record["ts"].replace("Z", "+00:00")).astimezone(timezone.utc)
    return {"order_id": str(record["order_id"]), "ts": ts.isoformat().replace("+00:00", "Z"),
            "amount": int(record["amount_cents"]) / 100, "currency": str(record["currency"]).upper(),
            "country": str(record["country"]).upper()}


def _transform(staged: Path) -> dict[str, Any]:
    rows, bad_lines = [], []
    for number, line in enumerate((staged / "extracted.jsonl").read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            missing = [f for f in REQUIRED_FIELDS if f not in record]
            if missing:
                raise ValueError(f"missing {', '.join(missing)}")
            rows.append(_normalise(record))
        except (ValueError, TypeError, AttributeError) as exc:
            bad_lines.append(f"line {number}: {type(exc).__name__}: {exc}"[:200])
    _write_atomically(staged / "transformed.jsonl", "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))
    return {"rows": len(rows), "bad_lines": len(bad_lines), "problems": bad_lines[:MAX_PROBLEMS_REPORTED]}


@handler("etl.transform")
async def transform(ctx: Context, partition: str, staged: str) -> dict[str, Any]:
    """Parse and normalise the staged rows (amounts in units, codes upper-case, UTC
    times). A line that cannot be read is not an error to retry: it is counted and
    left for `etl.validate` to judge."""
    result = await asyncio.to_thread(_transform, Path(staged))
    return {"partition": partition, "staged": staged, **result}


# ----------------------------------------------------------------------------- validate

def _validate(partition: str, staged: Path, transform_problems: list[str], bad_lines: int) -> dict[str, Any]:
    problems = list(transform_problems)
    if bad_lines > len(transform_problems):
        problems.append(f"... and {bad_lines - len(transform_problems)} more unreadable lines")
    rows = [json.loads(line) for line in (staged / "transformed.jsonl").read_text().splitlines()]
    if not rows and not bad_lines:
        problems.append("the partition is empty")
    seen: set[str] = set()
    for row in rows:
        if row["ts"][:10] != partition:
            problems.append(f"order {row['order_id']}: ts {row['ts']} is outside the partition")
        if row["amount"] < 0:
            problems.append(f"order {row['order_id']}: negative amount {row['amount']}")
        if row["order_id"] in seen:
            problems.append(f"order {row['order_id']}: duplicate")
        seen.add(row["order_id"])
    return {"valid": not problems, "rows": len(rows) + bad_lines, "problem_count": len(problems),
            "problems": problems[:MAX_PROBLEMS_REPORTED]}


@handler("etl.validate")
async def validate(ctx: Context, partition: str, staged: str, problems: list[str] | None = None,
                   bad_lines: int = 0) -> dict[str, Any]:
    """Judge a partition. Bad data is not a failure of the step: retrying would find the
    same data, and failing would fail the whole backfill. The verdict is the output
    (`valid`, `problems`), and the workflow routes on it (load or quarantine)."""
    verdict = await asyncio.to_thread(_validate, partition, Path(staged), problems or [], bad_lines)
    if not verdict["valid"]:
        ctx.logger.warning("partition %s is invalid: %s", partition, "; ".join(verdict["problems"][:3]))
    return {"partition": partition, "staged": staged, **verdict}


# ----------------------------------------------------------------------------- load / quarantine

def _load(root: Path, partition: str, staged: Path) -> None:
    build = _build_dir(root, "clean", partition)
    shutil.copyfile(staged / "transformed.jsonl", build / "part-00000.jsonl")
    (build / "_SUCCESS").touch()
    _publish_dir(build, _partition_dir(root, "clean", partition))
    shutil.rmtree(_partition_dir(root, "quarantine", partition), ignore_errors=True)  # fixed since
    shutil.rmtree(staged, ignore_errors=True)


@handler("etl.load")
async def load(ctx: Context, root: str, partition: str, staged: str, rows: int) -> dict[str, Any]:
    """Publish the clean partition, replacing an earlier load of it."""
    await asyncio.to_thread(_load, Path(root), partition, Path(staged))
    path = _partition_dir(Path(root), "clean", partition)
    return {"partition": partition, "outcome": "loaded", "rows": rows, "path": str(path)}


def _quarantine(root: Path, partition: str, staged: Path, reason: dict[str, Any]) -> None:
    build = _build_dir(root, "quarantine", partition)
    for f in sorted(_partition_dir(root, "raw", partition).glob("*.jsonl")):
        shutil.copyfile(f, build / f.name)
    (build / "_REASON.json").write_text(json.dumps(reason, indent=2) + "\n")
    _publish_dir(build, _partition_dir(root, "quarantine", partition))
    shutil.rmtree(_partition_dir(root, "clean", partition), ignore_errors=True)  # no longer valid as delivered
    shutil.rmtree(staged, ignore_errors=True)


@handler("etl.quarantine")
async def quarantine(ctx: Context, root: str, partition: str, staged: str, rows: int,
                     problems: list[str]) -> dict[str, Any]:
    """Set an invalid partition aside with the reason, for a person to look at. The raw
    zone is left as delivered: once upstream fixes the data, a re-run loads it."""
    reason = {"partition": partition, "run_id": ctx.run_id, "workflow": ctx.workflow,
              "rows": rows, "problems": problems}
    await asyncio.to_thread(_quarantine, Path(root), partition, Path(staged), reason)
    path = _partition_dir(Path(root), "quarantine", partition)
    return {"partition": partition, "outcome": "quarantined", "rows": rows, "problems": problems,
            "path": str(path)}


# ----------------------------------------------------------------------------- summary

def _summarise(root: Path, run_id: str, summary: dict[str, Any]) -> None:
    _write_atomically(root / "_summaries" / f"{run_id}.json", json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(root / "_staging" / run_id, ignore_errors=True)


@handler("etl.summarize")
async def summarize(ctx: Context, root: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Fan-in: count what the partitions came to and write it next to the data."""
    loaded = [r for r in results if r["outcome"] == "loaded"]
    quarantined = [r for r in results if r["outcome"] == "quarantined"]
    summary = {
        "run_id": ctx.run_id,
        "partitions": len(results),
        "loaded_partitions": len(loaded),
        "loaded_rows": sum(r["rows"] for r in loaded),
        "quarantined_partitions": len(quarantined),
        "quarantined_rows": sum(r["rows"] for r in quarantined),
        "quarantined": [r["partition"] for r in quarantined],
        "first": min((r["partition"] for r in results), default=None),
        "last": max((r["partition"] for r in results), default=None),
    }
    await asyncio.to_thread(_summarise, Path(root), ctx.run_id, summary)
    return {**summary, "summary_path": str(Path(root) / "_summaries" / f"{ctx.run_id}.json")}
