"""`python -m bench <workload>`: benchmarks against a real server process.

Prints a table, then every figure as one JSON object on the last line of stdout.
Exit codes: 0 all runs succeeded; 1 some run failed or the server did not start;
2 a usage error.
"""

from __future__ import annotations

import argparse
import sys

from bench import chain3, chaos, events, fanout, harness, latency, park, soak, timers

WORKLOADS = {
    "chain3": (chain3, "throughput of 3-step no-op runs, many in flight"),
    "latency": (latency, "3-step no-op runs one at a time"),
    "events": (events, "throughput of 3-step no-op runs started by JetStream events"),
    "timers": (timers, "many runs asleep on durable timers at once: how late they fire, memory"),
    "park": (park, "many runs parked on an approval signal: memory, a restart, then signal -> completion latency"),
    "fanout": (fanout, "one run mapping a step over many items with max_concurrency: items/s, peak concurrency"),
    "chaos": (chaos, "SIGKILL the server at random moments under a mixed load; check every run ended right"),
    "soak": (soak, "server memory over a long stream of chain3 runs (local only; 1,000,000 by default)"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="workload", required=True, metavar="WORKLOAD")
    for name, (module, help_text) in WORKLOADS.items():
        module.add_arguments(sub.add_parser(name, help=help_text, description=module.__doc__))
    args = parser.parse_args(argv)
    for option in ("runs", "concurrency", "events", "window", "count", "items", "max_concurrency", "chunk"):
        if getattr(args, option, 1) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    if getattr(args, "rate", 0.0) < 0:
        parser.error("--rate must not be negative")
    if getattr(args, "max_sleep", timers.MIN_SLEEP_S) < timers.MIN_SLEEP_S:
        parser.error(f"--max-sleep must be at least {timers.MIN_SLEEP_S:g}")
    if (getattr(args, "lead", None) or 0.0) < 0:
        parser.error("--lead must not be negative")
    if getattr(args, "signal_rate", 1.0) <= 0:
        parser.error("--signal-rate must be positive")
    if getattr(args, "wait", None) == "approval" and args.signal_via == "nats":
        parser.error("--wait approval is decided over HTTP: leave out --signal-via nats")
    if getattr(args, "items", 1) > fanout.MAX_ITEMS:
        parser.error(f"--items must be at most {fanout.MAX_ITEMS}")
    if getattr(args, "delay_ms", 0.0) < 0:
        parser.error("--delay-ms must not be negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    module, _ = WORKLOADS[args.workload]
    try:
        return module.main(args)
    except harness.ServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
