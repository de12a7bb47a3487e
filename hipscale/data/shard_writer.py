"""Parallel, restartable writing of items into webdataset tar shards.

Items are assigned to shards by position alone (shard ``i`` holds items
``[i * n, (i + 1) * n)`` of the item list), so a re-run knows which items
belong to which shard before decoding anything. Each shard is written under a
temporary name; a status file (``status/<shard>.json``: fingerprint, counts,
rejected items) is written next, and the tar is renamed into place last. A
re-run skips every shard whose tar and matching status exist, deletes stale
temporary files and redoes the rest. Tar members carry fixed metadata
(mtime 0, mode 0644), so a shard's bytes depend only on its items.
"""
import dataclasses
import hashlib
import io
import json
import multiprocessing as mp
import os
import queue
import shutil
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from tqdm import tqdm

from hipscale.data.dataset_info import INDEX_FILE, REPORT_FILE, ShardEntry, write_json_atomic
from hipscale.data.errors import InputError

STATUS_DIR = "status"
SHARD_PATTERN = "shard-{:06d}.tar"

Members = list[tuple[str, bytes]]


@dataclass(frozen=True)
class Rejection:
    """An item that was not written, and why.

    Attributes:
        id: The item's id.
        source: Where it came from (file path, manifest line).
        reason: One of ``missing_file``, ``decode_error``, ``too_short``,
            ``no_audio``, ``unreadable_image``, ``duplicate_id``.
        detail: A human-readable explanation.
    """

    id: str
    source: str
    reason: str
    detail: str


Encoder = Callable[[Any], "Members | Rejection"]


@dataclass(frozen=True)
class ShardJob:
    """The items of one shard.

    Attributes:
        name: Shard file name.
        items: Picklable dataclass items, in writing order.
        fingerprint: Hash of the settings and items; a re-run only reuses a
            shard whose status has the same fingerprint.
    """

    name: str
    items: tuple[Any, ...]
    fingerprint: str


@dataclass(frozen=True)
class ShardResult:
    """A complete shard.

    Attributes:
        entry: Name, sample count and size.
        rejections: Items of this shard that were not written.
    """

    entry: ShardEntry
    rejections: tuple[Rejection, ...]


def samples_per_shard(max_samples: int, max_bytes: int, bytes_per_sample: int) -> int:
    """Turns the shard limits into a fixed sample count per shard.

    Args:
        max_samples: Most samples in a shard.
        max_bytes: Most bytes in a shard.
        bytes_per_sample: An upper estimate of one sample's size in the tar.

    Returns:
        ``min(max_samples, max_bytes // bytes_per_sample)``, at least 1.

    Raises:
        InputError: If a limit is not positive.
    """
    if max_samples < 1 or max_bytes < 1:
        raise InputError(f"shard limits must be positive, got {max_samples} samples and {max_bytes} bytes")
    return max(1, min(max_samples, max_bytes // bytes_per_sample))


def plan_shards(items: Sequence[Any], per_shard: int, settings: dict[str, Any]) -> list[ShardJob]:
    """Assigns items to shards by position.

    Args:
        items: Dataclass items in a deterministic order.
        per_shard: Items per shard (the last shard may hold fewer).
        settings: Everything else that changes the shard bytes.

    Returns:
        One job per shard.
    """
    jobs = []
    for index, start in enumerate(range(0, len(items), per_shard)):
        chunk = tuple(items[start:start + per_shard])
        described = json.dumps({"settings": settings, "items": [dataclasses.asdict(item) for item in chunk]},
                               sort_keys=True, default=str)
        jobs.append(ShardJob(SHARD_PATTERN.format(index), chunk, hashlib.sha256(described.encode()).hexdigest()))
    return jobs


def write_shards(out_dir: Path, jobs: Sequence[ShardJob], encode: Encoder, workers: int, unit: str,
                 overwrite: bool = False) -> list[ShardResult]:
    """Writes the shards not yet complete, in parallel, with a progress bar.

    Args:
        out_dir: Output directory (created if needed).
        jobs: Every shard of the dataset.
        encode: Turns an item into tar members, or into a rejection; it must
            be picklable and must reject, not raise, on bad media.
        workers: Number of worker processes.
        unit: Progress-bar unit, e.g. ``"clip"``.
        overwrite: Delete earlier output first instead of resuming.

    Returns:
        One result per job, in job order.

    Raises:
        InputError: If ``out_dir`` holds a shard written with other settings
            or items (and ``overwrite`` is false).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        _clear(out_dir)
    (out_dir / STATUS_DIR).mkdir(exist_ok=True)
    for stale in [*out_dir.glob(".*.tmp"), *(out_dir / STATUS_DIR).glob(".*.tmp")]:
        stale.unlink()
    done = {job.name: result for job in jobs if (result := _completed(out_dir, job)) is not None}
    todo = [job for job in jobs if job.name not in done]
    total = sum(len(job.items) for job in jobs)
    with tqdm(total=total, initial=total - sum(len(job.items) for job in todo), unit=unit,
              dynamic_ncols=True, smoothing=0.1) as bar:
        for result in _run_pool(out_dir, todo, encode, workers, bar):
            done[result.entry.name] = result
    return [done[job.name] for job in jobs]


def write_report(out_dir: Path, results: Sequence[ShardResult], early: Sequence[Rejection]) -> dict[str, Any]:
    """Writes ``report.json``: counts, and every rejected item with its reason.

    Args:
        out_dir: Output directory.
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
    write_json_atomic(out_dir / REPORT_FILE, report)
    return report


def build_shard(job: ShardJob, encode: Encoder, out_dir: Path, on_item: Callable[[], None]) -> ShardResult:
    """Encodes the items of one shard and writes it under a temporary name.

    Args:
        job: The shard.
        encode: See :func:`write_shards`.
        out_dir: Output directory.
        on_item: Called after every item (progress).

    Returns:
        The complete shard.
    """
    tmp = out_dir / f".{job.name}.tmp"
    rejections = []
    samples = 0
    with open(tmp, "wb") as file:
        with tarfile.open(fileobj=file, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for item in job.items:
                result = encode(item)
                if isinstance(result, Rejection):
                    rejections.append(result)
                else:
                    for name, data in result:
                        _add_member(tar, name, data)
                    samples += 1
                on_item()
        file.flush()
        os.fsync(file.fileno())
    result = ShardResult(ShardEntry(job.name, samples, tmp.stat().st_size, file_sha256(tmp)), tuple(rejections))
    write_json_atomic(_status_path(out_dir, job.name), {
        "fingerprint": job.fingerprint,
        "entry": dataclasses.asdict(result.entry),
        "rejections": [dataclasses.asdict(r) for r in rejections],
    })
    os.replace(tmp, out_dir / job.name)
    return result


_worker: dict[str, Any] = {}


def _init_worker(encode: Encoder, out_dir: Path, progress: "mp.Queue[int]") -> None:
    _worker.update(encode=encode, out_dir=out_dir, progress=progress)


def _build_in_worker(job: ShardJob) -> ShardResult:
    return build_shard(job, _worker["encode"], _worker["out_dir"], lambda: _worker["progress"].put(1))


def _run_pool(out_dir: Path, todo: list[ShardJob], encode: Encoder, workers: int, bar: tqdm) -> list[ShardResult]:
    if not todo:
        return []
    context = mp.get_context("fork")
    progress = context.Queue()
    with context.Pool(max(1, min(workers, len(todo))), initializer=_init_worker,
                      initargs=(encode, out_dir, progress)) as pool:
        pending = pool.map_async(_build_in_worker, todo, chunksize=1)
        remaining = sum(len(job.items) for job in todo)
        while remaining:
            try:
                progress.get(timeout=0.2)
            except queue.Empty:
                if pending.ready():
                    break
                continue
            remaining -= 1
            bar.update()
        results = pending.get()
    bar.update(remaining)
    return results


def _completed(out_dir: Path, job: ShardJob) -> ShardResult | None:
    status_path = _status_path(out_dir, job.name)
    tar_path = out_dir / job.name
    if not (status_path.is_file() and tar_path.is_file()):
        return None
    status = json.loads(status_path.read_text())
    if status["fingerprint"] != job.fingerprint:
        raise InputError(f"{tar_path} was written with other settings or other items; "
                         "use a fresh --out directory or pass --overwrite")
    entry = ShardEntry(**status["entry"])
    if entry.bytes != tar_path.stat().st_size:
        return None
    return ShardResult(entry, tuple(Rejection(**r) for r in status["rejections"]))


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (a just-written shard comes from the page cache)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _status_path(out_dir: Path, name: str) -> Path:
    return out_dir / STATUS_DIR / f"{name}.json"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def _clear(out_dir: Path) -> None:
    for path in [*out_dir.glob("shard-*.tar"), out_dir / INDEX_FILE, out_dir / REPORT_FILE]:
        path.unlink(missing_ok=True)
    shutil.rmtree(out_dir / STATUS_DIR, ignore_errors=True)

