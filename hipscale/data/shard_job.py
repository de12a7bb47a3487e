"""The work and finish steps of a sharding plan, for any engine that runs commands (SLURM, Ray, a loop).

    preprocess/shard_av.py ... --out OUT --plan-units 64              # plan: OUT/plan.json, 64 units
    python -m hipscale.data.shard_job work --plan OUT --units 0..7   # on any machine, any number of times
    python -m hipscale.data.shard_job finish --plan OUT              # once: check, report.json, index.json
    python -m hipscale.data.shard_job units OUT                      # the plan's unit count (for scripts)

``work`` builds the shards of its units that are not complete yet (supervised workers: an item that hangs or
kills its worker is rejected and recorded, also for other attempts) and exits 0 when all of them are complete.
``finish`` exits 0 after writing report.json and index.json, 1 naming every missing or inconsistent shard
and the units to run again (nothing written), 2 on bad input. ``python -m hipscale.data.status OUT`` shows
the progress while the work runs.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Optional

from hipscale.data.errors import InputError
from hipscale.data.sharding.run import IncompleteDataset, finish_dataset, load_plan, write_shards
from hipscale.data.sharding.shard_av import AVShardConfig, ClipItem, encode_clip
from hipscale.data.sharding.shard_destination import open_destination
from hipscale.data.sharding.shard_images import ImageItem, ImageShardConfig, encode_image
from hipscale.data.sharding.shard_plan import DatasetPlan, config_from_json, parse_units
from hipscale.data.sharding.shard_progress import ProgressReport

EXIT_DONE, EXIT_INCOMPLETE, EXIT_BAD_INPUT = 0, 1, 2


@dataclass(frozen=True)
class Sharder:
    """What `work` needs of a sharder: its settings, its items and its encoder."""

    config_type: type
    item_type: type
    encode: Callable[..., Any]
    unit: str


SHARDERS = {"images": Sharder(ImageShardConfig, ImageItem, encode_image, "image"),
            "av": Sharder(AVShardConfig, ClipItem, encode_clip, "clip")}


def item_type(sharder: str) -> type:
    return SHARDERS[sharder].item_type


def work(out: str, units_text: str, workers: int, staging: Optional[str] = None) -> None:
    """Builds the missing shards of some units of the plan at `out`.

    Raises:
        InputError: No plan, units outside it, or shards written with other settings.
        RuntimeError: A worker died twice outside any item (a full disk, say).
    """
    destination = open_destination(out, staging, argument="--plan")
    header_only = load_plan(destination, item_type)
    units = parse_units(units_text, header_only.num_units)
    plan = load_plan(destination, item_type, units)
    sharder = SHARDERS[plan.sharder]
    config = config_from_json(sharder.config_type, plan.config)
    jobs = [job for unit in units for job in plan.unit_jobs(unit)]
    progress = ProgressReport(destination, units)
    finished = False
    try:
        write_shards(destination, jobs, partial(sharder.encode, config=config), workers, sharder.unit,
                     item_timeout_s=config.item_timeout_s, progress=progress)
        finished = True
    finally:
        progress.close(finished)


def finish(out: str, verify_hashes: bool = True) -> dict[str, Any]:
    """Checks the dataset at `out` against its plan and writes report.json, then index.json."""
    destination = open_destination(out, argument="--plan")
    plan: DatasetPlan = load_plan(destination, item_type)
    return finish_dataset(destination, plan, verify_hashes)


def explain_incomplete(out: str, error: IncompleteDataset) -> str:
    """What ``finish`` found wrong, one line per problem, and the units to run again."""
    return "\n".join([f"{out}/{line}" for line in error.problems] + [
        f"error: {out}: {len(error.problems)} problems; nothing written. Run these units again: "
        f"{','.join(map(str, error.units))}"])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hipscale.data.shard_job", description=__doc__.splitlines()[0])
    steps = parser.add_subparsers(dest="step", required=True)
    work_parser = steps.add_parser("work", help="build the missing shards of some units")
    work_parser.add_argument("--plan", required=True, help="the sharder's --out (folder or s3:// / gs:// URL)")
    work_parser.add_argument("--units", required=True, help="N, I..J (both included) or a list: 0,3,5..9")
    work_parser.add_argument("--workers", type=int, default=os.cpu_count(), help="worker processes (default: all)")
    work_parser.add_argument("--staging", default=None, help="local folder for shards before their upload")
    finish_parser = steps.add_parser("finish", help="check every planned shard, write report.json and index.json")
    finish_parser.add_argument("--plan", required=True, help="the sharder's --out")
    finish_parser.add_argument("--no-hash", dest="verify_hashes", action="store_false",
                               help="check tar sizes only, not their SHA-256 (hashing reads, or downloads, every tar)")
    units_parser = steps.add_parser("units", help="print the plan's number of units")
    units_parser.add_argument("plan", help="the sharder's --out")
    args = parser.parse_args(argv)
    try:
        if args.step == "units":
            print(load_plan(open_destination(args.plan, argument="PLAN"), item_type).num_units)
        elif args.step == "work":
            work(args.plan, args.units, max(1, args.workers), args.staging)
            print(f"units {args.units} of {args.plan}: every shard complete")
        else:
            report = finish(args.plan, args.verify_hashes)
            print(f"{args.plan}: every planned shard checks out; wrote {report['written']} samples, rejected "
                  f"{report['rejected']} {report['by_reason']} (report.json, index.json)")
    except InputError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_INCOMPLETE
    except IncompleteDataset as error:
        print(explain_incomplete(args.plan, error), file=sys.stderr)
        return EXIT_INCOMPLETE
    return EXIT_DONE


if __name__ == "__main__":
    sys.exit(main())
