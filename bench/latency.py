"""latency: chain3 runs one at a time, so each run's latency is the overhead of the
API, the engine and three durable step transitions with nothing queued beside it."""

from __future__ import annotations

import argparse

from bench import chain3, harness


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=300, help="measured runs (default: 300)")
    parser.add_argument("--warmup", type=int, default=20, help="runs before measuring, not counted (default: 20)")
    harness.add_server_arguments(parser)


def main(args: argparse.Namespace) -> int:
    figures = chain3.measure(args, "latency", args.runs, concurrency=1)
    harness.report(f"latency: {args.runs} chain3 runs one at a time, sqlite {args.sync}", figures)
    return 0 if figures["failures"] == 0 else 1
