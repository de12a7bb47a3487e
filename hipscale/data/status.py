"""The progress of a sharding plan's work across every machine, read while it runs.

    python -m hipscale.data.status OUT [--json]

OUT is the sharder's ``--out`` (a folder or an s3:// / gs:// URL) holding ``plan.json``. Prints the shards and
units complete, the items done (finished shards plus the shards the running attempts are in), the rate of
the attempts that wrote in the last minute, the ETA at that rate, and the rejections so far by reason.
Exit status 0, or 2 when OUT has no plan.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from typing import Any, Optional

from hipscale.data.errors import InputError
from hipscale.data.format.dataset_info import INDEX_FILE
from hipscale.data.shard_job import item_type
from hipscale.data.sharding.run import complete_shards, load_plan
from hipscale.data.sharding.shard_destination import open_destination
from hipscale.data.sharding.shard_progress import PROGRESS_DIR
from hipscale.data.sharding.shard_writer import STATUS_DIR
from hipscale.results_stdout import results_stdout

LIVE_S = 60.0  # an attempt that wrote its progress this recently counts as running


def job_status(out: str, now: Optional[float] = None) -> dict[str, Any]:
    """The whole job's progress: shards, units, items, running attempts, rate, ETA, rejections."""
    now = time.time() if now is None else now
    destination = open_destination(out, argument="OUT")
    plan = load_plan(destination, item_type)
    complete = complete_shards(destination, plan)
    reasons = Counter(r.reason for r in plan.early)
    for i in complete:
        reasons.update(r["reason"] for r in destination.read_json(f"{STATUS_DIR}/{plan.jobs[i].name}.json")
                       ["rejections"])
    attempts = [destination.read_json(name) for name in destination.names(f"{PROGRESS_DIR}/")]
    running = [a for a in attempts if not a["finished"] and now - a["updated"] < LIVE_S]
    rate = sum(a["items_done"] / max(1e-6, a["updated"] - a["started"]) for a in running)
    total = sum(plan.item_counts)
    done = min(total, sum(plan.item_counts[i] for i in complete) + sum(a["items_in_flight"] for a in running))
    units_complete = plan.num_units - len(plan.unfinished_units(complete))
    return {"shards": len(plan.jobs), "shards_complete": len(complete), "units": plan.num_units,
            "units_complete": units_complete, "items": total, "items_done": done,
            "running": [{"host": a["host"], "pid": a["pid"], "units": a["units"]} for a in running],
            "items_per_s": rate, "eta_s": (total - done) / rate if rate > 0 else None,
            "rejected": dict(sorted(reasons.items())), "indexed": destination.size(INDEX_FILE) is not None}


def describe(out: str, s: dict[str, Any]) -> str:
    eta = "unknown (no attempt running)" if s["eta_s"] is None else f"{s['eta_s'] / 60:.1f} min"
    hosts = Counter(a["host"] for a in s["running"])
    return "\n".join([
        f"{out}: {s['shards_complete']} of {s['shards']} shards, {s['units_complete']} of {s['units']} units complete"
        f"{' (finished: index.json written)' if s['indexed'] else ''}",
        f"items: {s['items_done']} of {s['items']} ({100 * s['items_done'] / max(1, s['items']):.1f}%)",
        f"running: {len(s['running'])} attempts on {len(hosts)} hosts, {s['items_per_s']:.2f} items/s; ETA {eta}",
        f"rejected so far: {sum(s['rejected'].values())} {s['rejected']}"])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hipscale.data.status", description=__doc__.splitlines()[0])
    parser.add_argument("out", help="the sharder's --out, holding plan.json")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    args = parser.parse_args(argv)
    with results_stdout() as stdout:
        try:
            status = job_status(args.out)
        except InputError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(json.dumps(status, indent=1) if args.json else describe(args.out, status), file=stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
