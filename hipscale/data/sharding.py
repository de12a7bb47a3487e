"""Writing a whole dataset: its shards in supervised workers, published to the destination, the index last.

A re-run with the same settings keeps every complete shard (in the folder, or uploaded under the URL) and
builds the rest, so a killed sharder restarts where it stopped.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Sequence

from tqdm import tqdm

from hipscale.data.dataset_info import INDEX_FILE, REPORT_FILE, DatasetInfo
from hipscale.data.shard_destination import LocalDestination, RemoteDestination
from hipscale.data.shard_workers import DEFAULT_ITEM_TIMEOUT_S, run_supervised
from hipscale.data.shard_writer import Encoder, Rejection, ShardJob, ShardResult

Destination = LocalDestination | RemoteDestination


def write_shards(destination: Destination, jobs: Sequence[ShardJob], encode: Encoder, workers: int, unit: str,
                 overwrite: bool = False, item_timeout_s: float = DEFAULT_ITEM_TIMEOUT_S) -> list[ShardResult]:
    """Writes the shards not yet complete, in parallel, with a progress bar.

    Args:
        destination: Where the shards go (:func:`hipscale.data.shard_destination.open_destination`).
        jobs: Every shard of the dataset.
        encode: Turns an item into tar members, or into a rejection; it must
            be picklable and must reject, not raise, on bad media.
        workers: Number of worker processes.
        unit: Progress-bar unit, e.g. ``"clip"``.
        overwrite: Delete earlier output first instead of resuming.
        item_timeout_s: Seconds one item may take before it is rejected as ``timeout``.

    Returns:
        One result per job, in job order.

    Raises:
        InputError: If the destination holds a shard written with other settings
            or items (and ``overwrite`` is false).
    """
    destination.prepare(overwrite)
    done = {job.name: result for job in jobs if (result := destination.completed(job)) is not None}
    todo = [job for job in jobs if job.name not in done]
    total = sum(len(job.items) for job in jobs)
    with tqdm(total=total, initial=total - sum(len(job.items) for job in todo), unit=unit,
              dynamic_ncols=True, smoothing=0.1) as bar:
        for result in run_supervised(destination.work_dir, todo, encode, max(1, min(workers, len(todo))),
                                     item_timeout_s, bar.update):
            destination.publish(result)
            done[result.entry.name] = result
    return [done[job.name] for job in jobs]


def finish_dataset(destination: Destination, info: DatasetInfo, results: Sequence[ShardResult],
                   early: Sequence[Rejection]) -> dict[str, Any]:
    """Writes ``report.json`` (counts, and every rejected item with its reason), then ``index.json``.

    Args:
        destination: Where the shards went.
        info: The dataset description, its shards included.
        results: Every shard.
        early: Items rejected before sharding (e.g. duplicate ids).

    Returns:
        The report content.
    """
    rejections = list(early) + [rejection for result in results for rejection in result.rejections]
    report = {
        "written": sum(result.entry.samples for result in results),
        "rejected": len(rejections),
        "by_reason": dict(sorted(Counter(r.reason for r in rejections).items())),
        "rejections": [dataclasses.asdict(r) for r in rejections],
    }
    destination.write_json(REPORT_FILE, report)
    destination.write_json(INDEX_FILE, info.to_json())
    return report
