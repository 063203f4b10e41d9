"""Top functions of a py-spy profile: `python -m bench.profile_summary PROFILE [--top N]`.

PROFILE is py-spy's raw (collapsed) format, one stack a line: `root;...;leaf COUNT`,
each frame `function (file:line)`. Frames are merged by function and file (the
line is dropped). Self time counts the samples where a function is the leaf;
cumulative time the samples where it is anywhere on the stack (once per stack, so
recursion is not double counted). `python -m bench <workload> --py-spy FILE` writes
such a profile of the server.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

_LINE = re.compile(r":\d+\)$")


def _frame(raw: str) -> str:
    return _LINE.sub(")", raw.strip())


def summarize(text: str, thread: str = "") -> tuple[int, Counter[str], Counter[str], Counter[str]]:
    """(total samples, self samples by function, cumulative by function, samples by thread).

    A profile taken with `--threads` starts each stack with a `thread (...)` frame;
    it is counted apart and left out of the function tables. With `thread`, only
    stacks whose thread frame contains that text are counted.
    """
    total = 0
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";")]
        if thread and not (frames[0].startswith("thread (") and thread in frames[0]):
            continue
        total += count
        if frames[0].startswith("thread ("):
            threads[frames.pop(0)] += count
            if not frames:
                continue
        own[frames[-1]] += count
        for name in set(frames):
            cumulative[name] += count
    return total, own, cumulative, threads


def _table(title: str, counts: Counter[str], total: int, top: int) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("%", justify="right")
    table.add_column("samples", justify="right")
    table.add_column("function (file)")
    for name, count in counts.most_common(top):
        table.add_row(f"{100 * count / total:.1f}", str(count), name)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_summary", description=__doc__.splitlines()[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--thread", default="", metavar="TEXT",
                        help="only threads whose name contains TEXT, e.g. MainThread")
    parser.add_argument("--exclude", action="append", default=[], metavar="TEXT",
                        help="leave out frames containing TEXT from the cumulative table (repeatable)")
    args = parser.parse_args(argv)
    total, own, cumulative, threads = summarize(args.profile.read_text(), args.thread)
    if not total:
        print(f"no samples in {args.profile}")
        return 1
    for text in args.exclude:
        for name in [n for n in cumulative if text in n]:
            del cumulative[name]
    console = Console(width=200)
    console.print(f"{total} samples in {args.profile}", highlight=False)
    for name, count in threads.most_common():
        console.print(f"  {100 * count / total:5.1f}%  {name}", highlight=False, markup=False)
    console.print(_table(f"top {args.top} by self time", own, total, args.top))
    console.print(_table(f"top {args.top} by cumulative time", cumulative, total, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
