"""What the sharding command lines share: run, report, exit code."""
from __future__ import annotations

import sys
from typing import Any, Callable

from hipscale.data.errors import InputError


def run_sharder(parse_args: Callable[[list[str]], Any], shard: Callable[[Any], dict], argv: list[str],
                noun: str) -> int:
    """Parses `argv`, shards, prints a one-line summary.

    Args:
        parse_args: Turns the arguments into a sharding config (with an `out` directory).
        shard: Runs the sharder on that config and returns the content of report.json.
        argv: Arguments without the program name.
        noun: What the items are called in the summary ("clips", "images").

    Returns:
        The exit code: 0 when every item was written or rejected and reported, 2 on bad input.
    """
    try:
        config = parse_args(argv)
        report = shard(config)
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {report['written']} {noun} to {config.out}; rejected {report['rejected']} "
          f"{report['by_reason']} (see report.json)")
    return 0
