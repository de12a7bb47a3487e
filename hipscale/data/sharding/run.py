"""Writing a whole dataset from its plan: shards built in supervised workers, checked, the index last.

One machine runs all three steps of :mod:`hipscale.data.sharding.shard_plan` in one command (``preprocess/shard_*.py``);
a cluster runs ``work`` for slices of the units on many machines and ``finish`` once. A re-run with the same
settings keeps every complete shard and builds the rest, so a killed sharder restarts where it stopped.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Callable, Optional, Sequence

from tqdm import tqdm

from hipscale.data.errors import InputError
from hipscale.data.format.dataset_info import INDEX_FILE, REPORT_FILE, ShardEntry
from hipscale.data.sharding.shard_destination import (LocalDestination, RemoteDestination, known_rejections,
                                                      open_destination, record_rejection)
from hipscale.data.sharding.shard_plan import PLAN_FILE, DatasetPlan, plan_from_json, unit_file
from hipscale.data.sharding.shard_progress import ProgressReport
from hipscale.data.sharding.shard_workers import DEFAULT_ITEM_TIMEOUT_S, run_supervised
from hipscale.data.sharding.shard_writer import STATUS_DIR, Encoder, Rejection, ShardJob, ShardResult

Destination = LocalDestination | RemoteDestination


class IncompleteDataset(Exception):
    """``finish`` found planned shards missing or inconsistent.

    Attributes:
        problems: One line per shard (or key) that does not check out.
        units: The units to run again.
    """

    def __init__(self, problems: list[str], units: list[int]):
        super().__init__(f"{len(problems)} problems; run these units again: {units}")
        self.problems, self.units = problems, units


def write_shards(destination: Destination, jobs: Sequence[ShardJob], encode: Encoder, workers: int, unit: str,
                 overwrite: bool = False, item_timeout_s: float = DEFAULT_ITEM_TIMEOUT_S,
                 progress: Optional[ProgressReport] = None) -> list[ShardResult]:
    """Writes the shards not yet complete, in parallel, with a progress bar.

    Args:
        destination: Where the shards go (:func:`hipscale.data.sharding.shard_destination.open_destination`).
        jobs: The shards to have.
        encode: Turns an item into tar members, or into a rejection; it must
            be picklable and must reject, not raise, on bad media.
        workers: Number of worker processes.
        unit: Progress-bar unit, e.g. ``"clip"``.
        overwrite: Delete earlier output first instead of resuming.
        item_timeout_s: Seconds one item may take before it is rejected as ``timeout``.
        progress: Where the progress of this attempt is published (``python -m hipscale.data.status``).

    Returns:
        One result per job, in job order.

    Raises:
        InputError: If the destination holds a shard written with other settings
            or items (and ``overwrite`` is false).
    """
    destination.prepare(overwrite)
    try:
        done = {job.name: result for job in jobs if (result := destination.completed(job)) is not None}
        todo = [job for job in jobs if job.name not in done]
        known = known_rejections(destination, todo)
        total = sum(len(job.items) for job in jobs)
        initial = total - sum(len(job.items) for job in todo)

        def rejected(job: ShardJob, index: int, rejection: Rejection) -> None:
            record_rejection(destination, job, index, rejection)
            if progress is not None:
                progress.rejected(1)

        def advanced(items: int) -> None:
            bar.update(items)
            if progress is not None:
                progress.advanced(items)

        with tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, smoothing=0.1) as bar:
            for result in run_supervised(destination.work_dir, todo, encode, max(1, min(workers, len(todo))),
                                         item_timeout_s, advanced, known, rejected):
                destination.publish(result)
                done[result.entry.name] = result
                if progress is not None:
                    progress.shard_finished(result.entry.samples + len(result.rejections))
                    progress.rejected(sum(r.reason not in ("timeout", "worker_died") for r in result.rejections))
    finally:
        destination.end_attempt()
    return [done[job.name] for job in jobs]


def shard_dataset(plan: DatasetPlan, encode: Encoder, config: Any, unit: str) -> dict[str, Any]:
    """A sharder's whole run on one machine, or only its plan (``config.plan_units``).

    Args:
        plan: Every shard, its items and the dataset description.
        encode: The sharder's item encoder.
        config: The sharder's settings (``out``, ``staging``, ``workers``, ``overwrite``, ``item_timeout_s``,
            ``plan_units``).
        unit: What one item is called (progress bar).

    Returns:
        The content of ``report.json``, or for a plan ``{"planned", "units", "items", "rejected"}``.
    """
    destination = open_destination(config.out, config.staging)
    if config.plan_units:
        destination.prepare(config.overwrite)
        save_plan(destination, plan)
        return {"planned": len(plan.jobs), "units": plan.num_units, "items": sum(plan.item_counts),
                "rejected": len(plan.early)}
    write_shards(destination, plan.jobs, encode, config.workers, unit, config.overwrite, config.item_timeout_s)
    return finish_dataset(destination, plan, verify_hashes=False)


def save_plan(destination: Destination, plan: DatasetPlan) -> None:
    """Writes the unit files, then ``plan.json`` (its presence means the plan is whole)."""
    for unit in range(plan.num_units):
        destination.write_json(unit_file(unit), plan.unit_content(unit))
    destination.write_json(PLAN_FILE, plan.header())


def load_plan(destination: Destination, item_type: Callable[[str], type], units: Sequence[int] = ()) -> DatasetPlan:
    """The plan at `destination`, with the items of `units` (`item_type`: sharder name -> its item class).

    Raises:
        InputError: If there is no plan (or an unreadable one).
    """
    where = f"{destination.description}/{PLAN_FILE}"
    try:
        header = destination.read_json(PLAN_FILE)
        contents = {unit: destination.read_json(unit_file(unit)) for unit in units}
    except FileNotFoundError as error:
        raise InputError(f"{where}: no plan ({error}); write one with preprocess/shard_*.py ... --plan-units N") \
            from None
    return plan_from_json(header, contents, item_type(header["sharder"]), where)


def complete_shards(destination: Destination, plan: DatasetPlan) -> list[int]:
    """Indices of the planned shards some attempt completed (their status is written; ``finish`` checks them)."""
    statuses = set(destination.names(f"{STATUS_DIR}/"))
    return [i for i, job in enumerate(plan.jobs) if f"{STATUS_DIR}/{job.name}.json" in statuses]


def finish_dataset(destination: Destination, plan: DatasetPlan, verify_hashes: bool = True) -> dict[str, Any]:
    """Checks every planned shard, then writes ``report.json`` (counts, every rejected item), then ``index.json``.

    Every planned shard must have a status with the plan's fingerprint accounting for all its items, and a
    tar of the recorded size (and, with `verify_hashes`, SHA-256); sample keys must be unique across the
    dataset. A shard whose tar does not match its status (two attempts that rejected different items wrote
    it at once) gets its status removed, so that running its unit again rebuilds it.

    Returns:
        The report content.

    Raises:
        IncompleteDataset: Naming every shard that is missing or inconsistent, and the units to run again.
    """
    problems, units, entries, keys = [], set(), [], Counter()
    rejections = list(plan.early)
    listed = set(destination.names(f"{STATUS_DIR}/"))
    for index, (job, count) in enumerate(zip(plan.jobs, plan.item_counts)):
        status_name = f"{STATUS_DIR}/{job.name}.json"
        problem = None
        if status_name not in listed:
            problem = "missing (no status: its unit did not finish)"
        else:
            status = destination.read_json(status_name)
            entry = ShardEntry(**status["entry"])
            if status["fingerprint"] != job.fingerprint:
                problem = "written with other settings or items than the plan's"
            elif entry.samples + len(status["rejections"]) != count:
                problem = f"its status accounts for {entry.samples + len(status['rejections'])} of {count} items"
            elif (found := _found_hash(destination, job.name, entry, verify_hashes)) != entry.sha256:
                problem = ("tar missing or of another size than its status records" if found is None else
                           "tar's SHA-256 differs from its status (two attempts wrote it at once)")
                destination.remove(status_name)
        if problem is not None:
            problems.append(f"{job.name}: {problem} (unit {plan.unit_of(index)})")
            units.add(plan.unit_of(index))
            continue
        entries.append(entry)
        keys.update(status.get("keys", ()))
        rejections.extend(Rejection(**r) for r in status["rejections"])
    planned = {f"{STATUS_DIR}/{job.name}.json" for job in plan.jobs}
    problems += [f"{name}: a status for a shard the plan does not have" for name in sorted(listed - planned)]
    problems += [f"sample key {key!r} is in {n} samples" for key, n in sorted(keys.items()) if n > 1]
    if problems:
        raise IncompleteDataset(problems, sorted(units))
    report = {
        "written": sum(entry.samples for entry in entries),
        "rejected": len(rejections),
        "by_reason": dict(sorted(Counter(r.reason for r in rejections).items())),
        "rejections": [dataclasses.asdict(r) for r in rejections],
    }
    destination.write_json(REPORT_FILE, report)
    destination.write_json(INDEX_FILE, dataclasses.replace(plan.info, shards=tuple(entries)).to_json())
    destination.clean_up()
    return report


def _found_hash(destination: Destination, name: str, entry: ShardEntry, verify: bool) -> str | None:
    """The tar's SHA-256 (or, not verifying, the recorded one when its size matches); None if missing."""
    if verify:
        return destination.sha256(name, entry.bytes)
    return entry.sha256 if destination.size(name) == entry.bytes else None
